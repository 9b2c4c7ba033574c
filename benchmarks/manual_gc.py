"""Python's automatic garbage collection off while a benchmark times (Megatron-LM's ``--manual-gc``), so its
pauses land on no system; one context manager for every benchmark here."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def automatic_collection(off: bool, collect_first: bool = False):
    """Python's automatic garbage collection off inside when ``off``, after one collection with
    ``collect_first``; the collector's previous state restored after, also when the body raises."""
    was_enabled = gc.isenabled()
    if off:
        if collect_first:
            gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
