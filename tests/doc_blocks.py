"""The fenced code blocks of README.md and docs/*.md, and the convention the documentation tests hold
them to.

Every fenced block names its language:

* ``python``: runs in the tests. Info ``""``: the ``""`` blocks of one page run in order as one script;
  ``file=NAME.py``: written to ``NAME.py`` next to that script (a ``test_*.py`` runs under pytest).
* ``bash``: runs in the tests, from the repository root on CPU, at the sizes written.
* ``json``: parsed. ``text``: output, diagrams and listings; nothing to run.

A python or bash block the tests cannot run (it needs GPUs, several machines, Megatron-LM, a network or
a long run) has ``<!-- not run: REASON -->`` on the line directly above its fence. Such a python block
is still compiled and its imports executed; such a bash block is still parsed (``bash -n``) and every
command, script and flag of this project it uses is checked against that program's ``--help``.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANGUAGES = ("python", "bash", "json", "text")
FENCE_OPEN = re.compile(r"^```(?P<lang>[\w+-]*)[ \t]*(?P<info>.*?)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:(?P<reason>.*?)-->\s*$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Block:
    """One fenced block: ``path`` relative to the repository root, ``line`` of its opening fence
    (1-based), ``lang`` and ``info`` from the fence, ``code`` (ends with a newline), ``not_run`` the
    marker's reason (``None``: no marker; ``""``: a marker without a reason)."""

    path: str
    line: int
    lang: str
    info: str
    code: str
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in ("python", "bash") and self.not_run is None

    @property
    def file_name(self) -> str | None:
        """``NAME`` of a ``python file=NAME`` block, else ``None``."""
        return self.info[5:] if self.info.startswith("file=") else None


def documents() -> list[str]:
    """README.md and docs/*.md, relative to the repository root."""
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def blocks(path: str) -> list[Block]:
    """Every fenced block of ``path`` (relative to the repository root, or absolute), in order."""
    rel = os.path.relpath(os.path.join(ROOT, path), ROOT)
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise ValueError(f"{rel}:{i + 1}: the fence opened here is never closed")
        marker = NOT_RUN.match(lines[i - 1].strip()) if i > 0 else None
        out.append(Block(path=rel, line=i + 1, lang=m["lang"], info=m["info"],
                         code="\n".join(lines[i + 1:end]) + "\n",
                         not_run=marker["reason"].strip() if marker else None))
        i = end + 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in documents() for b in blocks(doc)]


# --- the commands a bash block uses -------------------------------------------------------------

#: tokens that end one command and start the next
_SEPARATORS = {"&&", "||", ";", "|"}


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block as token lists: continuation lines joined, comments dropped,
    split at ``&&``, ``||``, ``;`` and ``|`` written as words; placeholders such as ``[--flag X]``
    keep their brackets."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        current = []
        for token in shlex.split(line, comments=True):
            if token in _SEPARATORS:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    return [c for c in out if c]


@dataclasses.dataclass(frozen=True)
class Program:
    """A program of this project, or a launcher, whose flags a doc uses. ``kind``: ``"cli"`` (``name``
    is the argv before ``--help``), ``"source"`` (``name`` is a shell script; a flag must occur in
    its text)."""

    kind: str
    name: tuple[str, ...]
    #: only flags with this prefix are checked (the rest belong to a program this one runs)
    prefix: str = "--"


def _program(tokens: list[str], i: int, python: str, at_command: bool) -> tuple[Program | None, int]:
    """The program that ``tokens[i]`` starts, and how many tokens it takes (0: none starts here).
    Bare command names (``locmoe``, ``torchrun``, ``deepspeed``) count only ``at_command`` (the start
    of a command, or after ``--``), since they are also flag values (``--framework deepspeed``);
    ``locmoe-megatron``, ``-m locmoe_plugin...`` and this repository's scripts count anywhere
    (a launcher runs them)."""
    tok = tokens[i]
    nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
    base = os.path.basename(tok)
    if base == "locmoe" and at_command:
        sub = (nxt,) if nxt and not nxt.startswith("-") else ()
        return Program("cli", (python, "-m", "locmoe_plugin.cli") + sub), 1 + len(sub)
    if tok == "-m" and nxt.startswith("locmoe_plugin"):
        after = tokens[i + 2] if i + 2 < len(tokens) else ""
        sub = (after,) if nxt == "locmoe_plugin.cli" and after and not after.startswith("-") else ()
        return Program("cli", (python, "-m", nxt) + sub), 2 + len(sub)
    if base == "locmoe-megatron":
        return Program("cli", (python, "-m", "locmoe_plugin.megatron.launcher"), prefix="--locmoe"), 1
    if base == "torchrun" and at_command:
        return Program("cli", (python, "-m", "torch.distributed.run")), 1
    if base == "deepspeed" and at_command:
        return Program("cli", (python, "-m", "deepspeed.launcher.runner")), 1
    if os.path.isfile(os.path.join(ROOT, tok)):
        if tok.endswith(".py"):
            return Program("cli", (python, tok)), 1
        if tok.endswith(".sh"):
            return Program("source", (tok,)), 1
    return None, 0


def flags_used(code: str, python: str) -> dict[Program, set[str]]:
    """``{program: flags}`` for every program of this project (and launcher) a bash block runs.

    A flag (``--name``, brackets of a placeholder and ``=value`` stripped) belongs to the last program
    before it; ``--`` ends a program's flags (the launchers' separator), and a command word that is
    not one of these programs (``pip``, ``python3`` before a script, ``export``) takes the flags after
    it out of the check."""
    used: dict[Program, set[str]] = {}
    for tokens in commands(code):
        current, expect_command, i = None, True, 0
        while i < len(tokens):
            program, width = _program(tokens, i, python, expect_command)
            if program is not None:
                current, expect_command = program, False
                used.setdefault(program, set())
                i += width
                continue
            tok = tokens[i].strip("[]")
            i += 1
            if tok == "--":
                current, expect_command = None, True
            elif tok.startswith("--") and len(tok) > 2:
                flag = tok.split("=", 1)[0]
                if current is not None and flag.startswith(current.prefix):
                    used[current].add(flag)
            elif expect_command and not re.match(r"^\w+=", tok) and not tok.startswith("-"):
                current, expect_command = None, False
    return used


# --- running blocks ------------------------------------------------------------------------------

def cpu_env(tmp_dir: str | None = None) -> dict[str, str]:
    """The environment documentation blocks run in: this checkout importable, the running Python's
    scripts (``python``, ``locmoe``, ``torchrun``) first on ``PATH``, the CPU device, one thread per
    process, temporary files under ``tmp_dir``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
               LOCMOE_DEVICE="cpu", OMP_NUM_THREADS="1")
    if tmp_dir is not None:
        env["TMPDIR"] = tmp_dir
    return env


def run_python(page_blocks: list[Block], tmp_dir: str, timeout: float = 600) -> str:
    """Run the runnable python blocks of one page in ``tmp_dir``: ``file=NAME`` blocks are written to
    ``NAME``, the ``""`` blocks run in order as one script, then pytest runs over ``tmp_dir`` if a
    ``test_*.py`` was written. Returns the combined stdout; raises ``AssertionError`` with the output's
    tail when a step fails."""
    runnable = [b for b in page_blocks if b.lang == "python" and b.runs]
    scripts = [b.code for b in runnable if b.file_name is None]
    files = {b.file_name: b.code for b in runnable if b.file_name is not None}
    assert scripts or any(n.startswith("test_") for n in files), \
        f"{page_blocks[0].path}: no python block to run (files {sorted(files)} are run by nothing)"
    for name, code in files.items():
        with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
            f.write(code)
    outputs = []
    steps = []
    if scripts:
        script = os.path.join(tmp_dir, "page.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write("\n\n".join(scripts))
        steps.append([sys.executable, script])
    if any(name.startswith("test_") for name in files):
        steps.append([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tmp_dir])
    for argv in steps:
        done = subprocess.run(argv, cwd=tmp_dir, env=cpu_env(tmp_dir), capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{page_blocks[0].path}: {' '.join(argv[1:])} failed\n" \
            + done.stdout[-4000:] + done.stderr[-4000:]
        outputs.append(done.stdout)
    return "\n".join(outputs)
