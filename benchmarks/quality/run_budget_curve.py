"""The speed/quality curve of the cross-node traffic budget, in resumable pieces.

    python benchmarks/quality/run_budget_curve.py OUT [--budgets off,0.3,0.2,0.1,0.05,0]
        [--seeds 1234,2345,3456] [--parallel 2] [--time-limit 540] [-- more bench_layer.py flags]

A point of ``--budgets`` is a budget, optionally with a warm-up of its target (``budget:warmup=W``,
``LocMoEConfig.cross_node_budget_warmup``: over the first W of the training steps the target falls from
(N-1)/N to the budget), a fixed locality loss beside it (``:mu=C``, ``LocMoEConfig.locality_loss_coeff``,
with its learned locality bias) and loss-free balancing (``:expert_bias=R``,
``LocMoEConfig.expert_bias_rate``), its own mechanism (``:mechanism=node``, else ``--mechanism``) and how
the LocMoE layer's token rows travel (``:format=fp8`` or ``int8``, ``DispatcherSettings.dispatch_format``), e.g.
``--budgets 0.1,0.1:warmup=300,0.1:mu=0.01,expert_bias=0.001,0.3:mechanism=node,expert_bias=0.001,0.2:format=fp8``
(a point's options follow its colon, separated by commas: an item ``key=value`` belongs to the point
before it).

One job per (point, seed) = one ``benchmarks/bench_layer.py`` run on NPROC ranks as emulated nodes
(``launch/emulate_nodes.sh``: NCCL's socket transport between nodes): it trains, on the same windows of
the byte-level corpus (same seed = same data, same initialisation of the shared parts), Megatron's
MoELayer with TopKRouter + aux loss (the baseline) and a LocMoE layer (dense gate, no locality loss) with
``cross_node_budget`` = the budget ("off" = no budget: the LocMoE router routing like TopK), evaluates
both on the same held-out windows, and times each trained layer's fwd+bwd against Megatron's alltoall
layer in the same process. The baseline is trained in every job, so each LocMoE point is paired with the
baseline of its own run (the repeats also show how reproducible one seed's baseline is).

Resumable: a job whose ``OUT/jobs/<job>.json`` exists is skipped. Jobs run ``--parallel`` at a time on
the same GPUs (each its own rendezvous port and NCCL host ids); no job is started that would not end
before ``--time-limit`` seconds (estimated from the jobs finished so far, ``--job-seconds`` before the
first), and jobs still running at the limit are stopped (rerun the command to finish them). At the end
the report (``budget_report.py``) writes ``OUT/table.txt``, ``OUT/curve.json`` and ``OUT/curve.png``
from every finished job. ``--dry-run`` prints the commands; ``--toy`` shrinks the model for a CPU run
(gloo).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import budget_report  # noqa: E402

sys.path.insert(0, str(ROOT))
from locmoe_plugin.comm.row_codec import DISPATCH_FORMATS  # noqa: E402
from locmoe_plugin.config import BUDGET_MECHANISMS, DEFAULT_BUDGET_MECHANISM  # noqa: E402

#: model and schedule of one job on the GPU machine (bench_layer.py flags). 32 experts top-4 over
#: 2 nodes x 2; ~4.9 M training tokens per model (600 steps x 16 x 128 x 4 ranks, cosine to 0.1 x lr)
#: and 32 x 4 x 16 x 128 held-out tokens, the same windows for every seed (bench_layer.py --eval-seed),
#: so the baseline's seed-to-seed spread is that of training alone.
GPU_FLAGS = ("--hidden 1024 --ffn 1024 --experts 32 --topk 4 --train-steps 600 --train-batch 16 --seq 128 "
             "--lr 1e-3 --lr-schedule cosine --eval-batches 32 --tokens 8192 --rounds 3 --iters 10 --manual-gc")
#: the same at toy size, for a CPU (gloo) check of the whole pipeline
TOY_FLAGS = ("--hidden 64 --ffn 64 --experts 8 --topk 2 --train-steps 30 --train-batch 2 --seq 32 --lr 3e-3 "
             "--lr-schedule cosine --eval-batches 2 --tokens 128 --warmup 1 --iters 2 --dtype fp32 --bw-mib 1")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="results folder (reused to resume)")
    p.add_argument("--budgets", default="off,0.3,0.2,0.1,0.05,0",
                   help="comma-separated points: a cross-node budget in [0, 1], optionally with the warm-up of its "
                        "target in training steps (0.1:warmup=300), a fixed locality loss (0.1:mu=0.01) and the "
                        "expert bias (0.1:expert_bias=0.001), its own mechanism (0.3:mechanism=node; else "
                        "--mechanism), several options after one colon (0.1:mu=0.01,expert_bias=0.001); 'off' = "
                        "LocMoE without a budget")
    p.add_argument("--mechanism", choices=BUDGET_MECHANISMS, default=DEFAULT_BUDGET_MECHANISM,
                   help="how the budget acts (LocMoEConfig.budget_mechanism; see docs/locality.md); jobs of "
                        "another mechanism are kept apart by their file name. Default: %(default)s")
    p.add_argument("--seeds", default="1234,2345,3456", help="comma-separated seeds (the pairing key)")
    p.add_argument("--nproc", type=int, default=4, help="ranks per job (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=2, help="ranks per emulated node")
    p.add_argument("--parallel", type=int, default=2, help="jobs at once on the same GPUs")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds this call may run")
    p.add_argument("--job-seconds", type=float, default=240.0, help="a job's duration before one has finished")
    p.add_argument("--port", type=int, default=29611, help="rendezvous port of the first parallel slot")
    p.add_argument("--toy", action="store_true", help="tiny model and few steps (CPU / gloo check)")
    p.add_argument("--dry-run", action="store_true", help="print the pending jobs' commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]  # after --: more bench_layer.py flags (later flags override the defaults)
    points = (parse_point(b) for b in split_points(args.budgets))
    args.points = list(dict.fromkeys(  # once each; a budget's mechanism made explicit
        p if p.budget is None else p._replace(mechanism=p.mechanism or args.mechanism) for p in points))
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.points or not args.seed_list:
        p.error("--budgets and --seeds need at least one value each")
    if args.parallel < 1 or args.nproc % args.gpus_per_node:
        p.error("--parallel must be >= 1 and --nproc divisible by --gpus-per-node")
    return args


def parse_budget(text: str) -> float | None:
    text = text.strip()
    if text == "off":
        return None
    value = float(text)
    if not 0 <= value <= 1:
        raise SystemExit(f"--budgets: {text} is not in [0, 1] (or 'off')")
    return value


def split_points(text: str) -> list[str]:
    """``"off,0.1:mu=0.01,expert_bias=0.001"`` -> ``["off", "0.1:mu=0.01,expert_bias=0.001"]``: a comma-separated
    item ``key=value`` without a colon is one more option of the point before it."""
    points: list[str] = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        if points and "=" in item and ":" not in item:
            points[-1] += "," + item
        else:
            points.append(item)
    return points


class Point(NamedTuple):
    """One point of the curve: a budget (None = no budget) and the LocMoE router's extra training settings."""

    budget: float | None
    warmup: int = 0  # LocMoEConfig.cross_node_budget_warmup, in training steps
    mu: float = 0.0  # LocMoEConfig.locality_loss_coeff (> 0: the learned locality loss and bias beside the budget)
    expert_bias: float = 0.0  # LocMoEConfig.expert_bias_rate (loss-free balancing)
    mechanism: str | None = None  # LocMoEConfig.budget_mechanism of this point (parse() sets --mechanism's)
    dispatch_format: str = "native"  # DispatcherSettings.dispatch_format of the LocMoE layer (trained and timed)


POINT_SYNTAX = ("a point is a budget in [0, 1] or 'off', with optional ':' options 'warmup=STEPS' (a whole number, "
                "needs a budget), 'mu=COEFF' and 'expert_bias=RATE' (numbers >= 0) and 'mechanism=" +
                "|".join(BUDGET_MECHANISMS) + "' (needs a budget; default --mechanism) and 'format=" +
                "|".join(DISPATCH_FORMATS) + "', e.g. 0.1:warmup=300 or "
                "0.1:mu=0.01,expert_bias=0.001 or 0.3:mechanism=node,expert_bias=0.001 or 0.2:format=fp8")


def parse_point(text: str) -> Point:
    """``"0.1"`` -> ``Point(0.1)``; ``"0.1:warmup=300"`` -> ``Point(0.1, warmup=300)``;
    ``"0.1:mu=0.01,expert_bias=0.001"`` -> ``Point(0.1, mu=0.01, expert_bias=0.001)``; ``"off"`` ->
    ``Point(None)``."""
    budget_text, _, options = text.strip().partition(":")
    point = Point(parse_budget(budget_text))
    for item in filter(None, options.split(",")):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in ("warmup", "mu", "expert_bias", "mechanism", "format"):
            raise SystemExit(f"--budgets: {text!r}: {POINT_SYNTAX}")
        if key == "format":
            if value not in DISPATCH_FORMATS:
                raise SystemExit(f"--budgets: {text!r}: {POINT_SYNTAX}")
            point = point._replace(dispatch_format=value)
        elif key == "mechanism":
            if value not in BUDGET_MECHANISMS or point.budget is None:
                raise SystemExit(f"--budgets: {text!r}: {POINT_SYNTAX}")
            point = point._replace(mechanism=value)
        elif key == "warmup":
            if not value.isdigit():
                raise SystemExit(f"--budgets: {text!r}: {POINT_SYNTAX}")
            point = point._replace(warmup=int(value))
        else:
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not (math.isfinite(number) and number >= 0):
                raise SystemExit(f"--budgets: {text!r}: {POINT_SYNTAX}")
            point = point._replace(**{key: number})
    if point.warmup and point.budget is None:
        raise SystemExit(f"--budgets: {text!r}: a warm-up needs a budget (e.g. 0.1:warmup={point.warmup})")
    return point


def job_name(point: Point, seed: int) -> str:
    """``budget-0.1-loss_seed-1234``; ``budget-0.1-selection-warmup-300_seed-1234`` (with a warm-up);
    ``budget-0.1-selection-mu-0.01-eb-0.001_seed-1234`` (with a locality loss and the expert bias);
    ``budget-0.2-selection-fmt-fp8_seed-1234`` (token rows sent as fp8);
    ``budget-off_seed-1234`` (no budget, no mechanism): runs of both mechanisms can share OUT, and "off" is
    run once for both. Points without options keep the names they had before options existed, so an
    earlier OUT resumes."""
    extra = (f"{f'-mu-{point.mu:g}' if point.mu else ''}"
             f"{f'-eb-{point.expert_bias:g}' if point.expert_bias else ''}"
             f"{f'-fmt-{point.dispatch_format}' if point.dispatch_format != 'native' else ''}")
    if point.budget is None:
        return f"budget-off{extra}_seed-{seed}"
    warmup = f"-warmup-{point.warmup}" if point.warmup else ""
    return f"budget-{point.budget:g}-{point.mechanism}{warmup}{extra}_seed-{seed}"


def job_command(args, point: Point, seed: int, slot: int, json_path: Path) -> list[str]:
    flags = shlex.split(TOY_FLAGS if args.toy else GPU_FLAGS)
    flags += ["--gates", "dense", "--mu", f"{point.mu:g}", "--systems", "locmoe", "mcore_alltoall",
              "--gpus-per-node", str(args.gpus_per_node), "--seed", str(seed), "--json", str(json_path)]
    if point.budget is not None:
        flags += ["--budget", str(point.budget), "--budget-mechanism", point.mechanism]
    if point.warmup:
        flags += ["--budget-warmup", str(point.warmup)]
    if point.expert_bias:
        flags += ["--expert-bias-rate", f"{point.expert_bias:g}"]
    if point.dispatch_format != "native":
        flags += ["--dispatch-format", point.dispatch_format]
    return ["bash", str(ROOT / "launch" / "emulate_nodes.sh"), "--nodes", str(args.nproc // args.gpus_per_node),
            "--nproc-per-node", str(args.nproc), "--master-port", str(args.port + slot),
            "--hostid-prefix", f"slot{slot}-", "--", str(ROOT / "benchmarks" / "bench_layer.py"),
            *flags, *args.extra]


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    pending = [(b, s) for s in args.seed_list for b in args.points
               if not (out / "jobs" / f"{job_name(b, s)}.json").exists()]
    print(f"budget curve: {len(pending)} job(s) pending of {len(args.points) * len(args.seed_list)} in {out}",
          flush=True)
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if "LOCMOE_COMMIT" not in env:  # recorded in every job's JSON and the table's header
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        env["LOCMOE_COMMIT"] = git.stdout.strip() or "unknown"
    if args.toy:
        env.setdefault("LOCMOE_DEVICE", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    if args.dry_run:
        for i, (b, s) in enumerate(pending):
            name = job_name(b, s)
            print(name + ": " + shlex.join(job_command(args, b, s, i % args.parallel, out / "jobs" / f"{name}.tmp.json")))
        return 0
    start, durations, running, failed = time.monotonic(), [], {}, []
    while pending or running:
        now = time.monotonic() - start
        estimate = max(durations) if durations else args.job_seconds
        free = [i for i in range(args.parallel) if i not in running]
        while pending and free and now + estimate <= args.time_limit:
            b, s = pending.pop(0)
            slot, name = free.pop(0), job_name(b, s)
            tmp = out / "jobs" / f"{name}.tmp.json"
            log = open(out / "jobs" / f"{name}.log", "w")
            cmd = job_command(args, b, s, slot, tmp)
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
            running[slot] = (proc, name, tmp, time.monotonic(), log)
            print(f"  [{now:6.0f} s] start {name} (slot {slot})", flush=True)
        if not running:
            break
        time.sleep(2)
        for slot, (proc, name, tmp, t0, log) in list(running.items()):
            over = time.monotonic() - start > args.time_limit
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:  # past the limit: stop the whole job (its process group)
                os.killpg(proc.pid, 15)
                proc.wait()
                print(f"  stopped {name} at the time limit (rerun to finish it)", flush=True)
            elif proc.returncode == 0 and tmp.exists():
                tmp.rename(out / "jobs" / f"{name}.json")
                durations.append(time.monotonic() - t0)
                print(f"  [{time.monotonic() - start:6.0f} s] done {name} ({durations[-1]:.0f} s)", flush=True)
            else:
                failed.append(name)
                print(f"  FAILED {name} (exit {proc.returncode}); see {out / 'jobs' / (name + '.log')}", flush=True)
            log.close()
            del running[slot]
    left = [job_name(b, s) for b, s in pending]
    if left:
        print(f"not started (time limit): {', '.join(left)}; rerun the same command to continue")
    budget_report.main([str(out)])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
