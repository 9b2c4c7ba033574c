"""Time of the dispatch-format codec (``locmoe_plugin.comm.row_codec``) against the plain fp32 formula it
equals bit for bit (``tests/test_dispatch_format.py``'s reference), on one device.

    python benchmarks/bench_codec.py [--tokens 8192] [--hidden 2048] [--topk 4] [--iters 50]

Encodes ``[tokens, hidden]`` bf16 rows (what a rank sends) and decodes ``[tokens x topk, hidden]`` (what an
expert rank receives), per format; checks that both forms give the same bits on this device; prints the
median ms of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from locmoe_plugin.comm.row_codec import RowCodec  # noqa: E402
from locmoe_plugin.device import get_accelerator  # noqa: E402
from tests.test_dispatch_format import _reference_decode, _reference_encode  # noqa: E402


def _median_ms(fn, iters: int, sync) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    acc = get_accelerator()
    dev = acc.device()
    sync = acc.synchronize
    x = torch.randn(a.tokens, a.hidden, device=dev).to(torch.bfloat16)
    name = "cpu" if acc.is_cpu else acc.module.get_device_name()
    print(f"codec on {name}: encode [{a.tokens}, {a.hidden}] bf16, decode "
          f"[{a.tokens * a.topk}, {a.hidden}], median of {a.iters}")
    for fmt in ("fp8", "int8"):
        c = RowCodec(fmt)
        enc = c.encode(x)
        many = enc.repeat(a.topk, 1)
        same = (torch.equal(enc, _reference_encode(c, x))
                and torch.equal(c.decode(many, a.hidden, torch.bfloat16),
                                _reference_decode(c, many, a.hidden, torch.bfloat16)))
        rows = {"encode": (lambda: c.encode(x), lambda: _reference_encode(c, x)),
                "decode": (lambda: c.decode(many, a.hidden, torch.bfloat16),
                           lambda: _reference_decode(c, many, a.hidden, torch.bfloat16))}
        for name, (ours, plain) in rows.items():
            t_ours, t_plain = _median_ms(ours, a.iters, sync), _median_ms(plain, a.iters, sync)
            print(f"  {fmt:<5} {name}: {t_ours:7.3f} ms (plain formula {t_plain:7.3f} ms, {t_ours / t_plain:.2f} x); "
                  f"bits equal: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
