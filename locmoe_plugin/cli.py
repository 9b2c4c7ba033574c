"""``locmoe``: the command-line entry point. One subcommand per job; ``locmoe --help`` lists them.

Exit status (every subcommand): 0 success; 1 the check failed (``check-comm``: hierarchical and flat
disagree, or a rank failed; ``demo``: a rank failed); 2 bad usage (a flag, option or environment
variable, with one line naming it); 3 an input or output file could not be read or written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .bounds import capacity_bounds


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_IO = 0, 1, 2, 3


def json_safe(value):
    """``value`` with every non-finite float replaced by None, so ``json.dumps`` writes valid JSON (no
    ``Infinity`` / ``NaN``). An infinite bound means "no finite capacity suffices"; read null so."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _cmd_capacity(args: argparse.Namespace) -> int:
    b = capacity_bounds(args.delta, args.hidden_size, args.num_experts)
    if args.json:
        print(json.dumps(json_safe(b), indent=2, sort_keys=True, allow_nan=False))
        return 0
    print(f"LocMoE capacity lower bound (Theorem 1), d={args.hidden_size}, n={args.num_experts}, delta={args.delta}")
    print(f"  p_delta = P(|cos| >= delta) = 1 - I_(delta^2)(1/2, (d-1)/2) : {b['p_delta']:.6g}")
    print(f"  ec_min exact  1/(n p_delta)                               : {b['ec_min_exact']:.4f}")
    print(f"  ec_min erfc   1/(n erfc(sqrt(delta^2 d/(2-delta^2))))     : {b['ec_min_erfc']:.4f}")
    print(f"  lower form    (1/n) exp(delta^2 d/(2-delta^2))            : {b['ec_min_exp']:.4f}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_check_comm(args: argparse.Namespace) -> int:
    from .comm.selfcheck import run

    return run(args)


def _cmd_bandwidth(args: argparse.Namespace) -> int:
    from .comm.bandwidth import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="locmoe",
        description="LocMoE / LocMoE+ routing and locality-aware All-to-All for Megatron-core and DeepSpeed.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("capacity", help="LocMoE's expert-capacity lower bound (exact and erfc forms)")
    c.add_argument("--hidden-size", type=int, required=True, help="model hidden size d")
    c.add_argument("--num-experts", type=int, required=True, help="number of experts n")
    c.add_argument("--delta", type=float, required=True, help="token-expert affinity threshold (paper: ~0.03)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_cmd_capacity)

    from .comm.selfcheck import add_arguments as add_check_arguments

    cc = sub.add_parser(
        "check-comm",
        help="hierarchical vs flat all-to-all self-test: exact parity, bytes across nodes, time",
        description="Spawn ranks (or run under torchrun), route random tokens, run hierarchical and flat "
        "dispatch+combine forward and backward; exit 1 unless they agree exactly.",
    )
    add_check_arguments(cc)
    cc.set_defaults(func=_cmd_check_comm)

    from .comm.bandwidth import add_arguments as add_bandwidth_arguments

    bw = sub.add_parser("bandwidth", help="all-to-all bandwidth inside a node and between nodes, and the link in use")
    add_bandwidth_arguments(bw)
    bw.set_defaults(func=_cmd_bandwidth)

    from .demo import add_demo_arguments

    d = sub.add_parser("demo", help="the main job: show what LocMoE routing does, on this machine")
    add_demo_arguments(d)
    d.set_defaults(func=_cmd_demo)

    from .projection.command import add_arguments as add_project_arguments, run as run_project

    pr = sub.add_parser("project", help="projected MoE layer and step time on your cluster, LocMoE vs peers")
    add_project_arguments(pr)
    pr.set_defaults(func=run_project)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:  # ConfigError and bad numeric input: one clear line, no traceback
        print(f"locmoe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file that cannot be read or written
        print(f"locmoe {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
