"""Every fenced block of README.md and docs/*.md runs as written, or says why not and is checked as far
as a CPU machine can: see tests/doc_blocks.py for the convention.

Runs here: each page's python blocks (one process per page), and each bash block on CPU from the
repository root (identical commands once). Run by another test instead, which checks their output:
docs/testing.md and docs/megatron.md (tests/test_docs.py), README's ``file=locmoe_core.py``
(tests/test_readme.py, under torchrun). README's first block (set up a venv, run the demo, run the whole
suite) is the command CI itself runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .doc_blocks import ROOT, Block, all_blocks, blocks, commands, cpu_env, flags_used, run_python

#: python blocks run by another test, by (page, fence info; "*": every python block of the page)
RUN_ELSEWHERE = {
    ("docs/testing.md", "*"): "tests/test_docs.py runs them as a user's test suite",
    ("docs/megatron.md", "*"): "tests/test_docs.py runs them and checks the metrics they print",
    ("README.md", "file=locmoe_core.py"): "tests/test_readme.py runs it under torchrun on 4 ranks",
}
README_SETUP = "README.md's first block: CI runs these two commands (they build a venv and run the whole suite)"
BLOCKS = all_blocks()


def _elsewhere(block: Block) -> str | None:
    if block.lang == "python":
        return RUN_ELSEWHERE.get((block.path, block.info)) or RUN_ELSEWHERE.get((block.path, "*"))
    if (block.path, block.line) == ("README.md", blocks("README.md")[0].line):
        return README_SETUP
    return None


def convention_errors(doc_blocks: list[Block]) -> list[str]:
    """One line per block that breaks the convention of tests/doc_blocks.py."""
    errors = []
    for b in doc_blocks:
        if b.lang not in ("python", "bash", "json", "text"):
            errors.append(f"{b.where}: fence ```{b.lang} - name one of python, bash, json, text (output)")
        if b.lang == "python" and b.info and not re.fullmatch(r"file=\w+\.py", b.info):
            errors.append(f"{b.where}: python fence info {b.info!r}: use no info or file=NAME.py; a block "
                          "that cannot run gets <!-- not run: REASON --> on the line above")
        if b.not_run is not None and len(b.not_run) < 10:
            errors.append(f"{b.where}: <!-- not run: ... --> needs a reason (what the block needs)")
        if b.not_run is not None and b.lang not in ("python", "bash"):
            errors.append(f"{b.where}: only python and bash blocks run; drop the not-run marker")
        if b.lang == "python":
            try:
                compile(b.code, b.where, "exec")
            except SyntaxError as e:
                errors.append(f"{b.where}: {e}")
        if b.lang == "json":
            try:
                json.loads(b.code)
            except ValueError as e:
                errors.append(f"{b.where}: {e}")
        if b.lang == "bash":
            done = subprocess.run(["bash", "-n"], input=b.code, capture_output=True, text=True)
            if done.returncode:
                errors.append(f"{b.where}: bash -n: {done.stderr.strip()}")
    return errors


def test_every_block_follows_the_convention():
    errors = convention_errors(BLOCKS)
    assert not errors, "\n".join(errors)


def _help_texts(programs) -> dict:
    """``--help`` output (or source text) of each program."""
    texts = {}
    for program in programs:
        if program.kind == "source":
            with open(f"{ROOT}/{program.name[0]}", encoding="utf-8") as f:
                texts[program] = f.read()
            continue
        done = subprocess.run([*program.name, "--help"], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{' '.join(program.name[1:])} --help failed:\n{done.stderr[-3000:]}"
        texts[program] = done.stdout
    return texts


def unknown_flags(doc_blocks: list[Block]) -> list[str]:
    """``"page:line: program --flag"`` for each flag a bash block gives a program that does not take it."""
    used = {b: flags_used(b.code, sys.executable) for b in doc_blocks if b.lang == "bash"}
    texts = _help_texts({p for per_block in used.values() for p in per_block})
    return [f"{b.where}: {' '.join(p.name[1:]) if p.kind == 'cli' else p.name[0]} {flag}"
            for b, per_block in used.items() for p, flags in per_block.items() for flag in sorted(flags)
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", texts[p])]


def test_every_command_and_flag_exists():
    """The commands of every bash block, run or not: each script of this repository, `locmoe`
    subcommand, `locmoe-megatron`, torchrun and deepspeed takes the flags the block gives it."""
    unknown = unknown_flags(BLOCKS)
    assert not unknown, "flags the program does not take:\n" + "\n".join(unknown)


def test_not_run_python_blocks_import():
    """The imports of each python block that is not run resolve (the names it uses exist)."""
    import ast

    pytest.importorskip("megatron.core")
    pytest.importorskip("deepspeed")

    imports = []
    for b in BLOCKS:
        if b.lang == "python" and b.not_run is not None:
            tree = ast.parse(b.code)
            imports += [ast.get_source_segment(b.code, node) for node in tree.body
                        if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports
    done = subprocess.run([sys.executable, "-c", "\n".join(imports)], cwd=ROOT, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


PYTHON_PAGES = sorted({b.path for b in BLOCKS if b.lang == "python" and b.runs and not _elsewhere(b)})


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page, tmp_path):
    if any("megatron" in b.code for b in blocks(page)):
        pytest.importorskip("megatron.core")
    run_python([b for b in blocks(page) if not _elsewhere(b)], str(tmp_path))


def _bash_to_run() -> list[Block]:
    seen, out = set(), []
    for b in BLOCKS:
        key = tuple(map(tuple, commands(b.code))) if b.lang == "bash" else None
        if b.lang == "bash" and b.runs and not _elsewhere(b) and key not in seen:
            seen.add(key)
            out.append(b)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("block", _bash_to_run(), ids=lambda b: b.where)
def test_bash_block_runs(block, tmp_path):
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=ROOT, env=cpu_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{block.where} failed:\n{block.code}\n" + done.stdout[-3000:] + done.stderr[-3000:]


def test_the_checks_can_fail(tmp_path):
    """A block without a language, a marker without a reason, a python block that does not compile, a
    flag a program does not take and a failing unmarked bash block are all caught."""
    doc = tmp_path / "doc.md"
    doc.write_text("```\nout\n```\n<!-- not run: -->\n```bash\ntrue\n```\n```python\ndef (\n```\n"
                   "<!-- not run: needs eight GPUs -->\n```bash\nlocmoe check-comm --no-such-flag 1\n"
                   "torchrun --nproc-per-node 2 benchmarks/op_count.py --megatron\n```\n```bash\nfalse\n```\n")
    found = blocks(str(doc))
    errors = convention_errors(found)
    assert [e.split(":")[1] for e in errors] == ["1", "5", "8"], errors
    assert [b.not_run for b in found] == [None, "", None, "needs eight GPUs", None]
    assert [e.split(": ", 1)[1] for e in unknown_flags(found)] == ["-m locmoe_plugin.cli check-comm --no-such-flag"]
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", found[-1].code], capture_output=True)
    assert found[-1].runs and done.returncode != 0
