#!/usr/bin/env bash
# Overlap of the inter-node transfer (split-by-origin dispatch) against the same dispatcher without it,
# in one command on NGPU GPUs (default 4; ~5 minutes at the default sizes):
#   * 2 emulated nodes x NGPU/2 (launch/emulate_nodes.sh), NCCL's default socket transport between them;
#   * the same with NCCL_NSOCKS_PERTHREAD=8 NCCL_SOCKET_NTHREADS=8 (a faster inter-node link);
#     both at cross-node shares 0, 0.15 and 0.5 of the routed pairs;
#   * one node x NGPU (the overlap is a no-op there: measures that it costs nothing).
# The 2-node runs probe their link (bench_dispatch.py --probe-link: before the first share and after each,
# ~0.3-0.5 s per sample at 32 MiB per peer), so validate_projection.py predicts their rows from their own link.
# 8192 tokens/rank, hidden 2048, expert MLPs d -> 1408 -> d, 32 experts, top-4, bf16; systems timed in
# interleaved shuffled rounds. Usage (repo root):
#   bash benchmarks/run_gpu_overlap.sh OUT_DIR
# FORMATS="fp8" (or "fp8 int8") adds each system with its rows encoded (bench_dispatch.py's SYSTEM_fp8) to the
# same interleaved rounds; RUNS="socket socket8 one" (the default) picks which of the three runs to make.
# Toy size on CPU (gloo): TOKENS=64 HIDDEN=32 FFN=16 EXPERTS=8 DTYPE=fp32 ITERS=2 ROUNDS=2 WARMUP=1 \
#   PYTHON=.venv/bin/python bash benchmarks/run_gpu_overlap.sh /tmp/overlap
set -uo pipefail
out=${1:?usage: run_gpu_overlap.sh OUT_DIR}
mkdir -p "$out"
NGPU=${NGPU:-4}
half=$(( NGPU / 2 ))
PY=${PYTHON:-python3}
export PYTHON=$PY NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
args=(--tokens "${TOKENS:-8192}" --hidden "${HIDDEN:-2048}" --expert-ffn "${FFN:-1408}" --experts "${EXPERTS:-32}"
      --topk "${TOPK:-4}" --dtype "${DTYPE:-bf16}" --iters "${ITERS:-5}" --rounds "${ROUNDS:-5}" --warmup "${WARMUP:-3}"
      --systems hierarchical overlap overlap_phases)
for f in ${FORMATS:-}; do args+=("hierarchical_$f" "overlap_$f" "overlap_phases_$f"); done
RUNS=${RUNS:-socket socket8 one}
shares=(--cross-share 0 0.15 0.5)
{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi -L 2>/dev/null; } > "$out/machine.txt"

run2() {  # name, extra env
  local name=$1; shift
  env "$@" launch/emulate_nodes.sh --nodes 2 --nproc-per-node "$NGPU" -- benchmarks/bench_dispatch.py \
    --gpus-per-node "$half" --json "$out/$name.json" --probe-link "${args[@]}" "${shares[@]}" > "$out/$name.log" 2>&1
  echo "$name: exit $?"
}
case " $RUNS " in *" socket "*) run2 "overlap_2x${half}_socket" NCCL_DEBUG=WARN ;; esac
case " $RUNS " in *" socket8 "*) run2 "overlap_2x${half}_socket8" NCCL_NSOCKS_PERTHREAD=8 NCCL_SOCKET_NTHREADS=8 ;; esac
case " $RUNS " in *" one "*)
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/bench_dispatch.py --gpus-per-node "$NGPU" \
    --json "$out/overlap_1x${NGPU}.json" "${args[@]}" > "$out/overlap_1x${NGPU}.log" 2>&1
  echo "overlap_1x${NGPU}: exit $?" ;;
esac

"$PY" - "$out" "$NGPU" <<'PYEOF'
import json, os, sys
out, ngpu = sys.argv[1], int(sys.argv[2])
print(f"{'run':<24} {'cross':>5} {'hier ms':>8} {'ovl ms':>8} {'ovl/hier':>8} {'ovl6/hier':>9} "
      f"{'coll hier/ovl':>13} {'syncs':>5} {'exp ms':>7} {'rail ms':>7} {'hidden':>6}")
for name in (f"overlap_2x{ngpu // 2}_socket", f"overlap_2x{ngpu // 2}_socket8", f"overlap_1x{ngpu}"):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        print(f"{name:<24} no result (see {name}.log)")
        continue
    rows = [(row, sfx) for row in json.load(open(path))["rows"]
            for sfx in ("", "_fp8", "_int8")  # native systems, then each format's (bench_dispatch.py SYSTEM_fmt)
            if "hierarchical" + sfx in row["systems"]]
    for row, sfx in rows:
        s = {k[: len(k) - len(sfx)] if sfx else k: v for k, v in row["systems"].items()
             if (k.endswith(sfx) if sfx else not k.endswith(("_fp8", "_int8")))}
        def ratio(a, b="hierarchical"):
            ra, rb = s.get(a, {}).get("ms_rounds"), s.get(b, {}).get("ms_rounds")
            if not ra or not rb:
                return float("nan")
            r = sorted(x / y for x, y in zip(ra, rb))
            return r[len(r) // 2] if len(r) % 2 else (r[len(r) // 2 - 1] + r[len(r) // 2]) / 2
        tl = s.get("overlap", {}).get("timeline", {})
        coll = f"{s['hierarchical'].get('collectives_per_forward')}/{s['overlap'].get('collectives_per_forward')}"
        print(f"{name + sfx:<24} {row['cross_node_pair_share']:>5.2f} {s['hierarchical']['ms']:>8.2f} {s['overlap']['ms']:>8.2f} "
              f"{ratio('overlap'):>8.3f} {ratio('overlap_phases'):>9.3f} {coll:>13} "
              f"{str(s['overlap'].get('host_syncs_per_forward')):>5} {tl.get('local_experts_ms', float('nan')):>7.2f} "
              f"{tl.get('rail_window_ms', float('nan')):>7.2f} {tl.get('overlap_share', float('nan')):>6.2f}")
PYEOF
