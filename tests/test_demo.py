"""``locmoe demo``, shortened: the main job runs end to end on CPU (4 gloo ranks = 2 nodes x 2) on the real
corpus, prints the table and writes the PNG; its measurements are consistent with each other."""

import json
import re
import math
import os
import subprocess
import sys

import pytest
import torch

from locmoe_plugin.demo.corpus import Corpus, load_corpus, sample_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(tmp_path, *args, timeout=600):
    cmd = [sys.executable, "-m", "locmoe_plugin.cli", "demo", "--steps", "6", "--eval-interval", "3",
           "--eval-batches", "1", "--out", str(tmp_path), "--no-progress", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _check_common(out, tmp_path, systems):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[re.search(r"^system +train loss", out.stdout, re.M).start():]
    for name in systems:
        assert f"\n{name} " in table
    png = tmp_path / "demo.png"
    assert f"plot: {png}" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["system"] for r in results] == systems
    for r in results:
        assert all(math.isfinite(x) for x in r["history"]["loss"])
        assert r["history"]["loss"][-1] < r["history"]["loss"][0]  # learns even in 6 steps
        assert r["history"]["loss"][0] == pytest.approx(math.log(256), abs=0.4)  # starts near uniform over bytes
        assert 0.0 <= r["cross_node_share"] <= 1.0
        assert r["inter_node_bytes_per_step"] > 0
        assert "Python documentation" in r["corpus"]
    return results


@pytest.mark.multiproc
def test_demo_megatron_shortened(tmp_path):
    out = _demo(tmp_path, "--systems", "baseline,locmoe")
    results = _check_common(out, tmp_path, ["baseline", "locmoe"])
    base = results[0]
    # Megatron's alltoall dispatcher sends every routed (token, expert) pair whose expert is on the other node,
    # in the forward dispatch and combine and again in backward: the bytes counted on the wire must match
    # the routing the monitor saw (hidden 128, fp32), up to the small count exchanges.
    pairs_per_step = 4 * 128 * 4 * 2 * 2  # micro-batch x seq x ranks x top-2 x layers
    cross_pairs = sum(s * pairs_per_step for s in base["history"]["cross_node_share"]) / 6
    expected = cross_pairs * 128 * 4 * 4
    assert base["inter_node_bytes_per_step"] == pytest.approx(expected, rel=0.02)
    # the hierarchical dispatcher sends each token at most once per remote node: never more than the flat one
    loc = results[1]
    loc_cross_pairs = sum(s * pairs_per_step for s in loc["history"]["cross_node_share"]) / 6
    assert loc["inter_node_bytes_per_step"] <= loc_cross_pairs * 128 * 4 * 4 * 1.02


@pytest.mark.multiproc
def test_demo_deepspeed_shortened(tmp_path):
    pytest.importorskip("deepspeed")
    out = _demo(tmp_path, "--framework", "deepspeed", "--systems", "baseline,locmoe", "--num-layers", "1")
    _check_common(out, tmp_path, ["baseline", "locmoe"])


def test_demo_rejects_bad_shape_before_spawning(tmp_path):
    out = _demo(tmp_path, "--hidden-size", "100", "--num-experts", "8", timeout=60)
    assert out.returncode == 2
    assert "--hidden-size 100 is not divisible by --num-experts 8" in out.stderr


def test_corpus_split_and_batches(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 50)
    c = load_corpus(docs, val_fraction=0.1, seed=0)
    assert isinstance(c, Corpus) and c.documents == 20 and c.vocab_size == 256
    train, val = bytes(c.train.tolist()).decode(), bytes(c.val.tolist()).decode()
    held_out = {i for i in range(20) if f"document {i} " in val}
    assert held_out and not any(f"document {i} " in train for i in held_out)  # split by document
    assert 0.05 < c.val.numel() / (c.train.numel() + c.val.numel()) < 0.2
    tokens, labels = sample_batch(c.train, 3, 16, torch.Generator().manual_seed(0))
    assert tokens.shape == labels.shape == (3, 16) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next byte
    with pytest.raises(ValueError, match="shorter than seq_len"):
        sample_batch(c.val[:10], 1, 16, torch.Generator())


@pytest.mark.multiproc
def test_quality_study_runs_per_system_and_resumes(tmp_path):
    """benchmarks/quality/run_quality.sh: one demo per system, merged at the end; a second call skips the
    finished systems (how a study cut short by a device-call limit resumes)."""
    env = dict(os.environ, BACKEND="gloo", NPROC="4", GPUS_PER_NODE="2", STEPS="3", SYSTEMS="baseline",
               PYTHON=sys.executable)
    small = ["--num-layers", "1", "--hidden-size", "64", "--num-heads", "4", "--num-experts", "8",
             "--ffn-hidden-size", "64", "--seq-len", "32", "--micro-batch", "2", "--eval-interval", "3",
             "--eval-batches", "1"]
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "quality", "run_quality.sh"), str(tmp_path), *small]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done = tmp_path / "systems" / "01-baseline" / "results.json"
    stamp = done.stat().st_mtime_ns
    assert "\nbaseline " in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "quality.png").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "== baseline: done" in again.stdout
    assert done.stat().st_mtime_ns == stamp  # not trained again


def test_report_merges_runs(tmp_path, capsys):
    """The merge step on the committed per-seed results of the quality rerun (partial.json format)."""
    from locmoe_plugin.demo import report

    base = os.path.join(ROOT, "benchmarks", "results", "2026-11-22_h200x2_quality_node_demand_capacity")
    runs = [os.path.join(base, f"seed{s}", "results.json") for s in (1234, 2345)]
    assert report.main([*runs, "--png", str(tmp_path / "merged.png")]) == 0
    table = capsys.readouterr().out
    assert table.count("\nbaseline ") == 2 and table.count("\nlocmoe+ ") == 2
    assert "1.981" in table and "1.869" in table  # the two seeds' baseline validation losses
    assert (tmp_path / "merged.png").exists()


def test_system_specs_parse_numbers_words_and_bools():
    from locmoe_plugin.demo.megatron_job import parse_system

    assert parse_system("locmoe+:mu=0.03,capacity_factor_min=1,renormalize_kept=true,drop_policy=choice") == (
        "locmoe+", {"locality_loss_coeff": 0.03, "capacity_factor_min": 1, "renormalize_kept": True,
                    "drop_policy": "choice"})
    assert parse_system("locmoe:renormalize=False") == ("locmoe", {"renormalize": False})
    with pytest.raises(ValueError, match="the baseline takes no LocMoE options"):
        parse_system("baseline:mu=0.1")


def test_locmoe_plus_system_takes_the_config_defaults():
    """``locmoe+`` sets no gate, locality or threshold of its own: LocMoEConfig's LocMoE+ defaults apply
    (dense gate, cross-node budget 0.2, resonance_mass 0.9), and options after the colon override them."""
    import argparse

    from locmoe_plugin.config import LocMoEConfig
    from locmoe_plugin.demo.megatron_job import locmoe_settings

    opts = argparse.Namespace(gpus_per_node=2, locality_coeff=0.01, locmoe_capacity="none", steps=30)
    settings = locmoe_settings("locmoe+", opts)
    assert settings == {"gpus_per_node": 2, "routing": "hybrid", "adaptive_interval": 3}
    cfg = LocMoEConfig(num_experts=8, hidden_size=128, **settings)
    assert (cfg.gate, cfg.cross_node_budget, cfg.locality_loss_coeff) == ("dense", 0.2, 0.0)
    assert (cfg.capacity, cfg.resonance_mass) == ("adaptive", 0.9)
    old = LocMoEConfig(num_experts=8, hidden_size=128,
                       **locmoe_settings("locmoe+:gate=grap,mu=0.01,resonance_mass=0", opts))
    assert (old.gate, old.cross_node_budget, old.locality_loss_coeff, old.resonance_mass) == ("grap", None, 0.01, 0)
    budget = locmoe_settings("locmoe+:budget=0.1", opts)
    assert budget["cross_node_budget"] == 0.1 and "locality_loss_coeff" not in budget
