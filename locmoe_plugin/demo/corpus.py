"""The demo's corpus: real English text, obtained from a package registry, tokenized with no network.

Source: the reStructuredText sources of the Python documentation as Debian packages them
(``python3.X-doc``: ``/usr/share/doc/python3.X/html/_sources/**/*.rst.txt``, ~11 MB of English prose and
examples, PSF licence). :func:`fetch_corpus` downloads the ``.deb`` with ``apt-get download`` (no root
needed) and unpacks it with ``dpkg-deb``; ``launch/setup_env.sh`` runs it at install time. On a machine
without apt, pass any text file or folder of ``.txt``/``.rst``/``.md`` files as ``--corpus``.

Tokenizer: bytes (vocabulary 256). It needs no download and no training, and byte-level language
modelling on prose is a real task (the loss falls from ln 256 = 5.55 nats towards ~1.5 as the model
learns spelling, words and markup).

Split: documents are shuffled with a fixed seed and the last ``val_fraction`` of them (by bytes) is the
validation set, so no validation document is seen in training.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

DEB_CANDIDATES = ("python3.11-doc", "python3.12-doc", "python3.13-doc", "python3-doc")
TEXT_SUFFIXES = (".txt", ".rst", ".md")
VOCAB_SIZE = 256


def default_data_dir() -> Path:
    """``$LOCMOE_DATA_DIR``, else ``data/`` of the source checkout the package runs from, else
    ``~/.cache/locmoe-plugin``."""
    env = os.environ.get("LOCMOE_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / "data"
    return Path.home() / ".cache" / "locmoe-plugin"


def default_corpus_path() -> Path:
    return default_data_dir() / "python-doc-corpus"


def fetch_corpus(dest: Path | None = None, quiet: bool = False) -> Path:
    """Download and unpack Debian's Python documentation sources into ``dest`` (idempotent).

    Returns ``dest``, a folder of ``*.rst.txt`` files plus ``SOURCE`` (the package and version used).
    Raises ``RuntimeError`` with the alternative (``--corpus``) when apt is not available.

    Safe when several processes (the ranks of one launch) call it at once: they take an exclusive lock on
    ``<dest>.lock`` in turn, the first one downloads, the others find ``SOURCE`` and return; the corpus
    appears at ``dest`` by one rename of a per-process staging folder, so no process reads a half copy.
    """
    dest = Path(dest) if dest else default_corpus_path()
    if (dest / "SOURCE").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest.with_name(dest.name + ".lock")):
        if (dest / "SOURCE").is_file():  # another process fetched it while this one waited
            return dest
        return _download_corpus(dest, quiet)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """``flock`` on a lock file (POSIX), held while the block runs; where ``fcntl`` is missing, no lock (one
    process fetches at a time is then the caller's job, as the demo does by fetching before it starts the
    ranks)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _download_corpus(dest: Path, quiet: bool) -> Path:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError(
            "fetching the demo corpus needs apt-get and dpkg-deb (Debian/Ubuntu); on other systems pass "
            "--corpus PATH with any English text file or folder of .txt/.rst/.md files"
        )
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in DEB_CANDIDATES:
            r = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
            debs = sorted(Path(tmp).glob("*.deb"))
            if r.returncode == 0 and debs:
                break
            errors.append(f"{name}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        else:
            raise RuntimeError(
                "could not download the demo corpus (" + "; ".join(errors) + "); run `apt-get update` "
                "or pass --corpus PATH with any English text"
            )
        unpacked = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        sources = sorted(unpacked.glob("usr/share/doc/python3*/html/_sources"))
        if not sources:
            raise RuntimeError(f"{debs[0].name} holds no html/_sources folder; pass --corpus PATH instead")
        staging = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(sources[0], staging)
        (staging / "SOURCE").write_text(f"Debian package {debs[0].name} (Python documentation sources)\n")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    if not quiet:
        print(f"corpus: {debs[0].name} -> {dest}")
    return dest


def _documents(path: Path) -> list[tuple[str, bytes]]:
    if path.is_file():
        return [(path.name, path.read_bytes())]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    return [(str(p.relative_to(path)), p.read_bytes()) for p in files]


@dataclass(frozen=True)
class Corpus:
    """Byte-tokenized train and validation streams (``uint8`` tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    documents: int

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.05, seed: int = 0) -> Corpus:
    """Load ``path`` (default: the fetched Python-documentation corpus, fetching it if missing)."""
    path = Path(path) if path else fetch_corpus(quiet=True)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    docs = _documents(path)
    if not docs:
        raise ValueError(f"corpus {path} holds no .txt/.rst/.md files")
    random.Random(seed).shuffle(docs)
    total = sum(len(b) for _, b in docs)
    train, val, seen = [], [], 0
    for _, data in docs:
        (val if seen >= (1 - val_fraction) * total and len(docs) > 1 else train).append(data)
        seen += len(data)
    if not val:  # a single document: split it by bytes
        data = train.pop()
        cut = int(len(data) * (1 - val_fraction))
        train, val = [data[:cut]], [data[cut:]]
    def as_tensor(parts):
        return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8)

    src = (path / "SOURCE").read_text().strip() if (path / "SOURCE").is_file() else str(path)
    return Corpus(train=as_tensor(train), val=as_tensor(val), source=src, documents=len(docs))


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator):
    """``batch`` random windows: ``(tokens [b, s], labels [b, s])`` as int64, labels shifted by one."""
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"corpus split of {stream.numel()} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    win = stream[idx].long()
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()
