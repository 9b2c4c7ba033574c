"""``locmoe-megatron SCRIPT [args...]``: run an unmodified Megatron-LM script (e.g. ``pretrain_gpt.py``)
with LocMoE enabled; add ``--locmoe`` and the other ``--locmoe-*`` flags to the usual arguments.
Works under ``torchrun --no-python locmoe-megatron pretrain_gpt.py ...`` too.

The script must be Megatron-LM's (it imports ``megatron.training``, whose argument parser and layer specs
the wrapper extends). A megatron-core script of your own builds its layers itself: call
``locmoe_plugin.megatron.enable(settings=...)`` or ``locmoe_spec(spec, settings)`` in it instead."""

from __future__ import annotations

import argparse
import ast
import os
import runpy
import sys


def _help() -> str:
    from .args import add_arguments

    parser = argparse.ArgumentParser(prog="locmoe-megatron SCRIPT", add_help=False,
                                     usage="locmoe-megatron SCRIPT [Megatron-LM arguments] --locmoe [--locmoe-* ...]")
    add_arguments(parser)
    return __doc__.strip() + "\n\n" + parser.format_help()


def imports_megatron_training(path: str) -> bool:
    """Whether the script at ``path`` imports ``megatron.training`` (Megatron-LM's training package)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "megatron.training" or node.module.startswith("megatron.training."):
                return True
            if node.module == "megatron" and any(a.name == "training" for a in node.names):
                return True
        if isinstance(node, ast.Import) and any(
            a.name == "megatron.training" or a.name.startswith("megatron.training.") for a in node.names
        ):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"locmoe-megatron: {script!r} is not a file (give the path of a Megatron-LM script)", file=sys.stderr)
        return 2
    if not imports_megatron_training(script):
        print(
            f"locmoe-megatron: {script!r} does not import megatron.training, so it is not a Megatron-LM script "
            f"and the wrapper cannot put LocMoE into it (its MoE layers would stay Megatron's). In a "
            f"megatron-core script of your own, call locmoe_plugin.megatron.enable(settings={{...}}) before "
            f"building the model, or build the layer specs with locmoe_plugin.megatron.locmoe_spec(spec, settings)",
            file=sys.stderr,
        )
        return 2
    from .enable import enable

    enable()
    sys.argv = [script] + rest
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
