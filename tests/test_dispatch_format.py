"""Rows in the dispatch direction as one byte per feature plus block scales (``dispatch_format``).

Single process: the codec's error bounds, exact round trips, zeros and non-finite values. Gloo, 4 ranks
(2 nodes x 2): with a codec the dispatcher is exactly the native dispatcher on decoded rows: its forward
equals the native forward on ``decode(encode(x))``, the combine's backward the native one on
``decode(encode(grad))``, the dispatch's backward the native one; fewer bytes go on the wire. The
overlapped path with a codec equals the unsplit one (2 nodes x 2, 4 nodes x 1). On one node x 4 the
format is a no-op: the native dispatcher, bit for bit and byte for byte.
"""

import pytest
import torch

from locmoe_plugin.comm.row_codec import BLOCK, DISPATCH_FORMATS, RowCodec, row_codec
from locmoe_plugin.comm.settings import DispatcherSettings
from locmoe_plugin.config import ConfigError

from ._dist import run_workers

D = 160  # two blocks of scales, the second one partial


def _bound(fmt, x, scale):
    """Largest error the module doc allows per element (before the final cast), plus fp32 rounding."""
    if fmt == "fp8":
        return torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    return scale / 2 * (1 + 1e-6)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
@pytest.mark.parametrize("d", [128, D, 7])
def test_round_trip_within_the_documented_bound(fmt, d):
    codec = RowCodec(fmt)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, d, generator=g) * torch.logspace(-3, 3, 50).unsqueeze(1)
    x[4] = 0  # a zero row: exact zeros, no division by zero
    x[5, : min(d, BLOCK)] = 0  # a zero block beside a non-zero one
    enc = codec.encode(x)
    assert enc.dtype == torch.uint8 and enc.shape == (50, codec.row_bytes(d)) == (50, d + 4 * -(-d // BLOCK))
    y = codec.decode(enc, d, torch.float32)
    assert torch.isfinite(y).all()
    assert torch.equal(y[4], torch.zeros(d)) and torch.equal(y[5, : min(d, BLOCK)], torch.zeros(min(d, BLOCK)))
    pad = torch.nn.functional.pad(x, (0, -d % BLOCK))
    scale = (pad.view(50, -1, BLOCK).abs().amax(2, keepdim=True) / codec.max_code).expand(-1, -1, BLOCK)
    scale = scale.reshape(50, -1)[:, :d]
    assert ((y - x).abs() <= _bound(fmt, x, scale)).all()
    # the codec does change the rows (a test of the codec that passed identities through would fail here)
    assert not torch.equal(y, x)
    assert codec.decode(enc, d, torch.bfloat16).dtype == torch.bfloat16


def _reference_encode(codec, x):
    """The codec's encoding written plainly (every pass in fp32, the bytes concatenated at the end)."""
    n, d = x.shape
    nb = codec.blocks(d)
    xf = torch.nn.functional.pad(x.float(), (0, nb * BLOCK - d)).view(n, nb, BLOCK)
    amax = xf.abs().amax(dim=2, keepdim=True)
    scale = amax / codec.max_code
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = xf / scale
    if codec.fmt == "int8":
        q = q.round()
    q = q.clamp(-codec.max_code, codec.max_code).to(codec.code_dtype).view(n, nb * BLOCK)[:, :d].view(torch.uint8)
    return torch.cat([q, scale.view(n, nb).view(torch.uint8).view(n, 4 * nb)], dim=1)


def _reference_decode(codec, packed, d, dtype):
    n = packed.shape[0]
    nb = codec.blocks(d)
    codes = packed[:, :d].contiguous().view(codec.code_dtype).float()
    scale = packed[:, d:].contiguous().view(torch.float32).view(n, nb, 1)
    vals = torch.nn.functional.pad(codes, (0, nb * BLOCK - d)).view(n, nb, BLOCK)
    return (vals * scale).view(n, nb * BLOCK)[:, :d].to(dtype)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_encoding_and_decoding_bitwise_as_the_plain_formula(fmt):
    """The codec's fused passes give the same bytes and values as the plain fp32 formula, for bf16, fp16 and
    fp32 rows, widths with and without a partial block, zero rows and non-finite values; decoding also from
    rows that start at an odd byte offset (a slice of a received buffer)."""
    codec = RowCodec(fmt)
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (256, D, 36):
            x = (torch.randn(40, d, generator=g) * torch.logspace(-4, 2, 40).unsqueeze(1)).to(dtype)
            x[3] = 0
            x[7, 1] = float("inf")
            x[8, 0] = float("nan")
            enc = codec.encode(x)
            assert torch.equal(enc, _reference_encode(codec, x)), (dtype, d)
            same = dict(rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN where the reference has NaN
            for out in (dtype, torch.float32):
                torch.testing.assert_close(codec.decode(enc, d, out), _reference_decode(codec, enc, d, out), **same)
            assert torch.equal(codec.encode(x.t().contiguous().t()), enc)  # a transposed (non-contiguous) input
            assert codec.decode(codec.encode(x[:0]), d, dtype).shape == (0, d)  # a rank without rows
            shifted = torch.cat([torch.zeros(40, 1, dtype=torch.uint8), enc], 1)[:, 1:]  # odd offset, row stride + 1
            torch.testing.assert_close(codec.decode(shifted, d, dtype), _reference_decode(codec, enc, d, dtype), **same)


def test_representable_rows_survive_exactly_and_non_finite_values_stay_visible():
    fp8 = RowCodec("fp8")
    codes = torch.tensor([448.0, -448.0, 0.0, 1.0, -0.5, 2**-9, 240.0, 3.5])  # E4M3 values
    x = (codes.repeat(20)[:D] * 2.0**-5).unsqueeze(0)  # every block holds +-448 * 2**-5: scale 2**-5
    assert torch.equal(fp8.decode(fp8.encode(x), D, torch.float32), x)
    int8 = RowCodec("int8")
    x = torch.arange(-127, 33, dtype=torch.float32).unsqueeze(0)  # integers
    x[0, BLOCK] = 127.0  # each block's amax 127 -> scale 1
    assert torch.equal(int8.decode(int8.encode(x), D, torch.float32), x)
    for codec in (fp8, int8):
        tiny = torch.zeros(2, D)
        tiny[0, 5] = 1e-43  # amax / max_code underflows to 0 in fp32: no 0 / 0, the block decodes to zeros
        tiny[1, 130] = -3e-38
        y = codec.decode(codec.encode(tiny), D, torch.float32)
        assert torch.isfinite(y).all() and y[0].abs().max() <= 1e-43 and y.is_contiguous()
        bad = torch.randn(3, D)
        bad[1, 3] = float("inf")
        bad[2, 140] = float("nan")
        y = codec.decode(codec.encode(bad), D, torch.float32)
        assert torch.isfinite(y[0]).all() and not torch.isfinite(y[1]).all() and not torch.isfinite(y[2]).all()


def test_formats_and_settings_are_checked_where_they_enter():
    assert DISPATCH_FORMATS == ("native", "fp8", "int8") and row_codec("native") is None
    assert row_codec("int8").fmt == "int8"
    with pytest.raises(ConfigError, match=r"dispatch_format='fp4' is not one of 'native', 'fp8', 'int8'"):
        row_codec("fp4")
    with pytest.raises(ConfigError, match=r"dispatch_format='bf8' is not one of 'native', 'fp8', 'int8': pick"):
        DispatcherSettings(dispatch_format="bf8")
    both = DispatcherSettings(overlap=True, dispatch_format="fp8")  # the overlapped routes move encoded rows
    assert both.agreement()["overlap"] and both.agreement()["dispatch_format"] == "fp8"
    s = DispatcherSettings(mode="flat", dispatch_format="int8")
    assert s.agreement()["dispatch_format"] == "int8"
    assert DispatcherSettings.of(s, overlap=False) == s  # overlap replaced, the format kept
    with pytest.raises(ValueError, match=r"encoded rows of 10 bytes cannot hold 160 features"):
        RowCodec("fp8").decode(torch.zeros(2, 10, dtype=torch.uint8), D, torch.float32)


def test_megatron_flag():
    pytest.importorskip("megatron.core")
    import argparse

    from locmoe_plugin.megatron.args import add_arguments, settings_from_args

    parser = add_arguments(argparse.ArgumentParser())
    base = ["--locmoe", "--locmoe-dispatch-format", "fp8"]
    args = parser.parse_args(base)
    args.num_experts, args.hidden_size, args.moe_router_topk = 8, 64, 2
    assert settings_from_args(args)[1].dispatch_format == "fp8"
    args.locmoe_overlap = "on"
    both = settings_from_args(args)[1]
    assert (both.overlap, both.dispatch_format) == (True, "fp8")
    with pytest.raises(SystemExit):
        parser.parse_args(["--locmoe-dispatch-format", "fp4"])


def _expert_fn(inp, tokens_per_expert, first_expert, W):
    outs, start = [], 0
    for le, c in enumerate(tokens_per_expert):
        outs.append(torch.tanh(inp[start : start + c] @ W[first_expert + le]))
        start += c
    return torch.cat(outs) if outs else inp[:0]


def _bytes_sent(fn):
    """Run ``fn`` counting the input bytes of every all-to-all and (allgather plan) all-gather of rows it
    starts on this rank."""
    import torch.distributed as dist

    from locmoe_plugin.comm import block_collectives

    sent = [0]
    reals = {(dist, "all_to_all_single"): dist.all_to_all_single,
             (block_collectives, "ALL_GATHER_SINGLE"): block_collectives.ALL_GATHER_SINGLE}

    def counting(real):
        def call(out, inp, *args, **kwargs):
            sent[0] += inp.numel() * inp.element_size()
            return real(out, inp, *args, **kwargs)
        return call

    for (module, name), real in reals.items():
        setattr(module, name, counting(real))
    try:
        result = fn()
    finally:
        for (module, name), real in reals.items():
            setattr(module, name, real)
    return result, sent[0]


def _codec_worker(rank, world, device="cpu"):
    """The cases of one rank on ``device`` (``tests/gpu/codec_parity.py`` runs them on CUDA with NCCL)."""
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    E, k = 8, 3
    out = {}
    for rpn, modes in ((2, ("hierarchical", "flat")), (4, ("hierarchical", "allgather"))):
        topo = Topology.from_ranks_per_node(world, rpn, E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        W = (torch.randn(E, D, D, generator=torch.Generator().manual_seed(5)) / 8).to(device)
        first = topo.ep_rank * topo.experts_per_rank
        g = torch.Generator().manual_seed(17 + rank)
        s = 6 + 3 * rank
        x = torch.randn(s, D, generator=g) * 3
        x[0] = 0  # a zero-norm token
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(s)])
        ids[1, 0] = -1  # a dropped slot
        w = torch.where(ids >= 0, torch.rand(s, k, generator=g), 0.0)
        cot = torch.randn(s, D, generator=g)  # the combine's output gradient
        x, ids, w, cot = x.to(device), ids.to(device), w.to(device), cot.to(device)
        for mode in modes:
            for fmt in ("fp8", "int8"):
                codec = row_codec(fmt)

                def run(disp, xx, grad_out):
                    xx = xx.clone().requires_grad_(True)
                    ww = w.clone().requires_grad_(True)
                    inp, h = disp.dispatch(xx, ids, ww)
                    rows = inp.detach().requires_grad_(True)
                    y = disp.combine(_expert_fn(rows, h.tokens_per_expert, first, W), h)
                    y.backward(grad_out)
                    g_in = torch.linspace(-1, 1, inp.numel(), device=inp.device).view_as(inp)  # a fixed gradient at the expert input
                    inp.backward(g_in)
                    return dict(inp=inp.detach(), y=y.detach(), g_rows=rows.grad, gx=xx.grad, gw=ww.grad,
                                traffic=disp.traffic.to_dict())

                coded, coded_bytes = _bytes_sent(lambda: run(TokenDispatcher(groups, mode, dispatch_format=fmt), x, cot))
                x_dec = codec.decode(codec.encode(x), D, x.dtype)
                cot_dec = codec.decode(codec.encode(cot), D, cot.dtype)
                native_dec, _ = _bytes_sent(lambda: run(TokenDispatcher(groups, mode), x_dec, cot_dec))
                native, native_bytes = _bytes_sent(lambda: run(TokenDispatcher(groups, mode), x, cot))
                out[(rpn, mode, fmt)] = dict(coded=coded, native_dec=native_dec, native=native, one_node=rpn == world,
                                             coded_bytes=coded_bytes, native_bytes=native_bytes,
                                             row_bytes=codec.row_bytes(D))
    return out


def check_codec_results(results) -> None:
    """Assert the codec properties on every rank's :func:`_codec_worker` result."""
    for rank, res in enumerate(results):
        for key, r in res.items():
            c, nd, n = r["coded"], r["native_dec"], r["native"]
            if r["one_node"]:
                # inside one node the format is a no-op: the native dispatcher on the raw rows, the same bytes
                for name in ("inp", "y", "g_rows", "gw", "gx"):
                    assert torch.equal(c[name], n[name]), (key, name, rank)
                assert c["traffic"] == n["traffic"] and r["coded_bytes"] == r["native_bytes"], (key, rank)
                continue
            # forward: the experts saw decode(encode(x)), bit for bit; the combine's backward broadcast
            # decode(encode(grad)); the dispatch's backward (the reduce) is the native one
            for name in ("inp", "y", "g_rows", "gw"):
                assert torch.equal(c[name], nd[name]), (key, name, rank)
            # dispatch's backward of the same gradient at the expert input: the same plan's reduce
            assert torch.equal(c["gx"], nd["gx"]), (key, rank)
            # and the codec is really applied (compared with the native rows, the results differ)
            if c["inp"].numel():
                assert not torch.equal(c["inp"], n["inp"]), (key, rank)
            # bytes: the traffic counter prices dispatch rows at the encoded width, combine rows native
            t, tn = c["traffic"], n["traffic"]
            assert t["dispatch_inter_bytes"] * D * 4 == tn["dispatch_inter_bytes"] * r["row_bytes"], key
            assert t["dispatch_intra_bytes"] * D * 4 == tn["dispatch_intra_bytes"] * r["row_bytes"], key
            assert (t["combine_inter_bytes"], t["combine_intra_bytes"]) == (tn["combine_inter_bytes"], tn["combine_intra_bytes"])
            # what the collectives moved: fewer bytes where this rank sent rows to another rank
            if tn["inter_bytes"] + tn["intra_bytes"]:
                assert r["coded_bytes"] < r["native_bytes"], (key, rank)


@pytest.mark.multiproc
def test_codec_dispatcher_is_the_native_one_on_decoded_rows_2x2_and_a_no_op_on_one_node():
    check_codec_results(run_workers(_codec_worker, 4))


def _codec_overlap_worker(rank, world, device="cpu"):
    """The overlapped path with a codec against the unsplit path with the same codec, on 2 nodes x 2 and
    4 nodes x 1 (several rail steps), through dispatch / combine and through ``forward(expert_fn)``."""
    import torch.distributed as dist

    from locmoe_plugin import Topology
    from locmoe_plugin.comm import TokenDispatcher, build_comm_groups

    from .test_dispatcher_dist import D as DD, _case_inputs, _expert_fn as row_exact_expert

    out = []
    for rpn, E, k in ((2, 8, 3), (1, 8, 3)):
        topo = Topology.from_ranks_per_node(world, rpn, E, ep_rank=rank)
        groups = build_comm_groups(topo, dist.group.WORLD)
        W = (torch.randn(E, DD, DD, generator=torch.Generator().manual_seed(5)) / 4).to(device)
        first = topo.ep_rank * topo.experts_per_rank
        e_r = topo.experts_per_rank
        own = [e for q in topo.ranks_of_node(topo.node) for e in range(q * e_r, (q + 1) * e_r)]
        cases = {
            "uneven": _case_inputs(rank, E, k, 5 + 7 * rank, 1, 0.0),
            "drops": _case_inputs(rank, E, k, 12, 2, 0.3),
            "empty": _case_inputs(rank, E, min(k, 2), 0 if rank == 1 else 9, 3, 0.1,
                                  only_experts=list(range(E // world)) + list(range(E - E // world, E))),
            "all_remote": _case_inputs(rank, E, k, 8, 8, 0.1, only_experts=[e for e in range(E) if e not in own]),
        }
        for name, (x, ids, w) in cases.items():
            x = 3 * x
            if x.shape[0]:
                x[0] = 0  # a zero-norm token
            x, ids, w = x.to(device), ids.to(device), w.to(device)
            cot = torch.linspace(-1, 1, x.numel(), device=device).view_as(x)  # the output gradient
            for fmt in ("fp8", "int8"):
                def run(overlap, through_forward, dispatch_format=fmt):
                    disp = TokenDispatcher(groups, "hierarchical", overlap=overlap, dispatch_format=dispatch_format)
                    xx = x.clone().requires_grad_(True)
                    ww = w.clone().requires_grad_(True)
                    split = None
                    if through_forward:
                        y = disp.forward(xx, ids, ww, lambda inp, tpe: row_exact_expert(inp, tpe, first, W))
                    else:
                        inp, h = disp.dispatch(xx, ids, ww)
                        split = h.plan.origin_split is not None
                        y = disp.combine(row_exact_expert(inp, h.tokens_per_expert, first, W), h)
                    y.backward(cot)
                    return dict(y=y.detach(), gx=xx.grad, gw=ww.grad, traffic=disp.traffic.to_dict(), split=split)

                res = {"hierarchical": run(False, False), "hierarchical_fwd": run(False, True)}
                res["overlap"], res["overlap_bytes"] = _bytes_sent(lambda: run(True, False))
                res["overlap_fwd"] = run(True, True)
                res["overlap_native"], res["overlap_native_bytes"] = _bytes_sent(lambda: run(True, False, "native"))
                out.append(((rpn, name, fmt), res))
    return out


def check_codec_overlap_results(results) -> None:
    """Assert :func:`_codec_overlap_worker`'s properties on every rank's result."""
    saw_split = saw_fewer = False
    for rank, res in enumerate(results):
        for key, r in res:
            h = r["hierarchical"]
            for other in ("hierarchical_fwd", "overlap", "overlap_fwd"):
                for name in ("y", "gx", "gw"):
                    assert torch.equal(h[name], r[other][name]), (key, other, name, rank)
                assert r[other]["traffic"] == h["traffic"], (key, other, rank)
            saw_split |= bool(r["overlap"]["split"])
            if r["overlap"]["split"] and h["y"].abs().sum() > 0:
                # the codec is really applied on the overlapped routes
                assert not torch.equal(r["overlap"]["y"], r["overlap_native"]["y"]), (key, rank)
            if r["overlap_native_bytes"]:
                assert r["overlap_bytes"] < r["overlap_native_bytes"], (key, rank)
                saw_fewer = True
    assert saw_split and saw_fewer


@pytest.mark.multiproc
def test_overlap_with_a_codec_equals_the_unsplit_codec_path_2x2_and_4x1():
    check_codec_overlap_results(run_workers(_codec_overlap_worker, 4))


def test_codec_benchmark_runs_and_checks_the_bits(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_codec.py"
    spec = importlib.util.spec_from_file_location("bench_codec", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tokens", "32", "--hidden", "256", "--topk", "2", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("bits equal: True") == 4 and "fp8   encode" in out and "int8  decode" in out
