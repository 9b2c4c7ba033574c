"""``fetch_corpus`` called by several processes at once (the ranks of one launch): one download, every
process gets the finished corpus, no staging folder left behind. ``apt-get`` and ``dpkg-deb`` are stand-in
scripts on ``PATH`` that log each call and stretch the download so the processes overlap."""

import multiprocessing as mp
import os
import stat

import pytest

from locmoe_plugin.demo.corpus import fetch_corpus

FAKE_APT = """#!/bin/sh
echo download >> "$FAKE_LOG"
sleep 0.5
echo fake > "$2.deb"
"""
FAKE_DPKG = """#!/bin/sh
mkdir -p "$3/usr/share/doc/python3.11/html/_sources"
echo "Some English text for the corpus." > "$3/usr/share/doc/python3.11/html/_sources/a.rst.txt"
"""


def _fetch(dest: str, out) -> None:
    try:
        out.put(str(fetch_corpus(dest, quiet=True)))
    except Exception as e:  # reported to the parent, which fails the test
        out.put(f"error: {type(e).__name__}: {e}")


@pytest.mark.skipif(os.name != "posix", reason="stand-in shell scripts")
def test_concurrent_fetch_downloads_once(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT), ("dpkg-deb", FAKE_DPKG)):
        script = bin_dir / name
        script.write_text(text)
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    dest = tmp_path / "data" / "corpus"

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fetch, args=(str(dest), out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)

    assert results == [str(dest)] * 4, results
    assert log.read_text().count("download") == 1
    assert (dest / "SOURCE").is_file() and (dest / "a.rst.txt").is_file()
    assert not [p.name for p in dest.parent.iterdir() if ".partial" in p.name]
