source .gpu/common.sh
A="--gpus-per-node 4 --gates dense --mu 0 --budget 0.2 --systems locmoe mcore_alltoall mcore_allgather --train-steps 100 --rounds 7 --iters 5 --manual-gc"
run() {  # run TAG ROOT COMMIT
  ( cd $2 && LOCMOE_COMMIT=$3 PYTHONPATH=/tmp/site:$PWD timeout 60 python3 -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/bench_layer.py $A --json $R/ab_$1.json 2>&1 | grep -v -i warn > $R/ab_$1.log )
  echo "$1: $(grep -E '^compare' $R/ab_$1.log | tr '\n' ' ')" >> $R/ab.txt
}
export LOCMOE_DATA_DIR=$PWD/data
run old1 .gpu/old 6d61c8e; run new1 . 5001c96; run old2 .gpu/old 6d61c8e; run new2 . 5001c96
run new3 . 5001c96; run old3 .gpu/old 6d61c8e; run new4 . 5001c96; run old4 .gpu/old 6d61c8e; run new5 . 5001c96; run old5 .gpu/old 6d61c8e; run new6 . 5001c96; run old6 .gpu/old 6d61c8e
tar czf $OUT/res.tgz -C /tmp res
cat $R/ab.txt
