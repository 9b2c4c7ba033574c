"""``locmoe-megatron SCRIPT [args...]``: run an unmodified Megatron-LM script (e.g. ``pretrain_gpt.py``)
with LocMoE enabled; add ``--locmoe`` and the other ``--locmoe-*`` flags to the usual arguments.
Works under ``torchrun --no-python locmoe-megatron pretrain_gpt.py ...`` too."""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"locmoe-megatron: {script!r} is not a file (give the path of a Megatron-LM script)", file=sys.stderr)
        return 2
    from .enable import enable

    enable()
    sys.argv = [script] + rest
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
