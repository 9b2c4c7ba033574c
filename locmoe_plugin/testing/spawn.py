"""Spawn N gloo ranks on one machine, optionally as K emulated nodes, with a deadline.

:func:`run_ranks` starts ``world_size`` processes that each call ``fn(rank, world_size, *args)`` inside an
initialised gloo process group and returns one :class:`RankResult` per rank: the return value (pickled
back to the parent) or the formatted traceback of the exception the rank raised. With ``nodes=K`` every
rank sees ``LOCMOE_GPUS_PER_NODE = world_size / K``, so LocMoE's topology (locality loss, cross-node
counts, the hierarchical dispatcher's two stages) treats the ranks as K nodes.

It never hangs: ranks still running at the deadline are killed and :class:`RanksDidNotFinish` names
them; once a rank has failed, the others get ``grace_s`` seconds to finish (a rank blocked in a
collective its failed peer will never join would otherwise wait for gloo's own timeout), then are killed
and reported as not finished. ``fn`` must be importable by the child processes (a module-level function),
its arguments and return value picklable. Each process pays the imports of what ``fn`` uses (about 7 s
with megatron-core or DeepSpeed on a small machine): put several cases in one spawn.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

#: the state of a rank that was killed (deadline, or a failed peer) before it returned
NOT_FINISHED = "did not finish"


@dataclass(frozen=True)
class RankResult:
    """What one rank produced. ``error`` is the rank's traceback (or :data:`NOT_FINISHED` and why), None
    when it returned ``value``; ``seconds``: when the rank finished, from the start (ranks that
    fail because a peer failed come later than that peer)."""

    rank: int
    value: Any = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class RanksDidNotFinish(RuntimeError):
    """Ranks that were still running at the deadline (they have been killed). ``results`` holds every
    rank's :class:`RankResult`, ``ranks`` the ones that did not finish."""

    def __init__(self, message: str, ranks: list[int], results: list[RankResult]) -> None:
        super().__init__(message)
        self.ranks = ranks
        self.results = results


def _entry(rank: int, world_size: int, fn: Callable, args: tuple, tmp: str, per_node: int | None,
           timeout_s: float) -> None:
    import torch.distributed as dist

    os.environ.setdefault("LOCMOE_DEVICE", "cpu")
    if per_node is not None:
        os.environ["LOCMOE_GPUS_PER_NODE"] = str(per_node)
    payload: tuple[str, Any]
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        payload = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        payload = ("error", traceback.format_exc())
    path = os.path.join(tmp, f"result{rank}.pkl")
    try:
        with open(path + ".tmp", "wb") as f:
            pickle.dump((*payload, time.time()), f)
    except Exception:  # noqa: BLE001 - an unpicklable return value is the rank's error
        with open(path + ".tmp", "wb") as f:
            pickle.dump(("error", "the return value could not be pickled:\n" + traceback.format_exc(),
                         time.time()), f)
    os.replace(path + ".tmp", path)  # the parent sees a complete file or none
    if dist.is_initialized():
        if payload[0] == "ok":
            dist.barrier()  # no rank tears the group down while a peer still uses it
        dist.destroy_process_group()


def _read(path: str, rank: int, start_wall: float) -> RankResult:
    with open(path, "rb") as f:
        status, value, finished_at = pickle.load(f)
    seconds = finished_at - start_wall  # the child's clock: ordered even when seen in one poll
    if status == "ok":
        return RankResult(rank, value=value, seconds=seconds)
    return RankResult(rank, error=value, seconds=seconds)


def run_ranks(fn: Callable, world_size: int, *args: Any, nodes: int | None = None, timeout: float = 300.0,
              grace_s: float = 15.0) -> list[RankResult]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; one :class:`RankResult` per rank.

    Args:
        fn: a module-level function (the children import it by name).
        world_size: number of ranks (processes), >= 1.
        nodes: emulate this many nodes of ``world_size / nodes`` ranks each (None: leave the topology to
            LocMoE's detection, which on one machine finds one node).
        timeout: seconds until unfinished ranks are killed and :class:`RanksDidNotFinish` is raised.
        grace_s: after a rank fails, seconds the others get before they are killed (reported with an
            error, not raised: the failed rank's traceback is the news).
    """
    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an integer >= 1")
    if not timeout > 0:
        raise ValueError(f"timeout={timeout!r} must be > 0 seconds")
    per_node = None
    if nodes is not None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or world_size % nodes:
            raise ValueError(f"nodes={nodes!r} must be a positive divisor of world_size={world_size}")
        per_node = world_size // nodes
    start, start_wall = time.monotonic(), time.time()
    deadline = start + timeout
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(world_size, fn, args, tmp, per_node, timeout), nprocs=world_size,
                                 join=False, start_method="spawn")
        paths = [os.path.join(tmp, f"result{r}.pkl") for r in range(world_size)]
        results: dict[int, RankResult] = {}
        failed_at = None
        while True:
            for r, path in enumerate(paths):
                if r not in results and os.path.exists(path):
                    results[r] = _read(path, r, start_wall)
                    if not results[r].ok and failed_at is None:
                        failed_at = time.monotonic()
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for r, p in enumerate(ctx.processes):  # a rank that died without a result (a crash, a kill)
                if r not in results and not p.is_alive() and not os.path.exists(paths[r]):
                    results[r] = RankResult(r, error=f"exited with code {p.exitcode} without a result",
                                            seconds=time.monotonic() - start)
                    failed_at = failed_at or time.monotonic()
            if not alive:
                break
            now = time.monotonic()
            if now >= deadline or (failed_at is not None and now >= failed_at + grace_s):
                break
            time.sleep(0.05)
        timed_out = time.monotonic() >= deadline
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)
        for r, path in enumerate(paths):  # a result written while we stopped the others still counts
            if r not in results and os.path.exists(path):
                results[r] = _read(path, r, start_wall)
        unfinished = [r for r in range(world_size) if r not in results]
        why = f"{NOT_FINISHED} within {timeout:g} s (killed)" if timed_out else \
            f"{NOT_FINISHED}: killed {grace_s:g} s after a peer failed"
        for r in unfinished:
            results[r] = RankResult(r, error=why, seconds=time.monotonic() - start)
        ordered = [results[r] for r in range(world_size)]
        if timed_out and unfinished:
            failed = [res.rank for res in ordered if not res.ok and res.rank not in unfinished]
            raise RanksDidNotFinish(
                f"rank(s) {unfinished} of {world_size} did not finish within {timeout:g} s and were killed"
                + (f"; rank(s) {failed} failed first:\n{ordered[failed[0]].error}" if failed else
                   " (a hang in a collective, or a timeout too short for the work)"),
                unfinished, ordered)
        return ordered


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's value; otherwise ``AssertionError`` with the traceback of the rank that failed first
    (the others often fail because of it) and the list of every failed rank (for tests)."""
    failed = sorted((res for res in results if not res.ok), key=lambda res: res.seconds)
    if failed:
        first = failed[0]
        raise AssertionError(f"rank {first.rank} failed (failed ranks: {sorted(r.rank for r in failed)}):\n{first.error}")
    return [res.value for res in results]
