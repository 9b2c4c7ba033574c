"""Where one training step's time goes: a profiling step with synchronisation at every phase boundary.

:class:`PhaseTimer` wraps chosen methods / module forwards of a model ("attention", "router", "dispatch",
"experts", "combine") for ONE step, kept apart from the timed steps (the synchronisations it adds would
perturb them):

- forward: the device is synchronised before and after each wrapped call and the wall time goes to its
  phase; nested wraps count in each (callers subtract);
- backward: each wrapped call registers a hook on its output's gradient; when the hook fires the device
  is synchronised and a time stamp taken. Backward time between two consecutive stamps goes to the
  phase whose stamp opened the interval, so the phases' backward times plus "before the first stamp"
  sum to the backward pass exactly (a phase's interval also holds the small ops that follow it in
  backward, e.g. the residual and norm between the attention and the next MoE layer).

:class:`LinkTimer` wraps ``torch.distributed.all_to_all_single`` for the same step and adds up the
synchronised time of the calls whose group spans more than one node: the all-to-all time spent on the
inter-node link (an asynchronous call is waited for at once).
"""

from __future__ import annotations

import collections
import time

import torch
import torch.distributed as dist


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)


class PhaseTimer:
    """Synchronised forward and backward wall time per phase for one step (see the module docstring)."""

    def __init__(self, sync):
        self.sync = sync
        self.fwd = collections.defaultdict(float)
        self.bwd = collections.defaultdict(float)
        self._stamps: list[tuple[float, str]] = []
        self._undo = []

    def _call(self, phase: str, fn, args, kwargs, backward: bool):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.fwd[phase] += time.perf_counter() - t0
        if backward and torch.is_grad_enabled():
            grads = [t for t in _tensors(out) if t.requires_grad]
            if grads:
                def stamp(g, _phase=phase):
                    self.sync()
                    self._stamps.append((time.perf_counter(), _phase))
                    return g

                grads[-1].register_hook(stamp)
        return out

    def wrap_method(self, obj, name: str, phase: str, backward: bool = True) -> bool:
        """Time ``obj.name(...)`` as ``phase`` (an instance attribute shadows the method until
        :meth:`remove`). False if ``obj`` has no such method."""
        orig = getattr(obj, name, None)
        if orig is None:
            return False

        def timed(*args, **kwargs):
            return self._call(phase, orig, args, kwargs, backward)

        setattr(obj, name, timed)
        self._undo.append((obj, name))
        return True

    def wrap_module(self, module, phase: str, backward: bool = True) -> None:
        self.wrap_method(module, "forward", phase, backward)

    def backward(self, fn) -> float:
        """Run ``fn()`` (the backward pass), attributing its time to phases; returns its seconds."""
        self._stamps.clear()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        t1 = time.perf_counter()
        stamps = sorted(self._stamps)
        if stamps:
            self.bwd["before first phase"] += stamps[0][0] - t0
        else:
            self.bwd["before first phase"] += t1 - t0
        for (t, phase), nxt in zip(stamps, stamps[1:] + [(t1, None)]):
            self.bwd[phase] += nxt[0] - t
        return t1 - t0

    def remove(self) -> None:
        for obj, name in reversed(self._undo):
            delattr(obj, name)
        self._undo.clear()


class LinkTimer:
    """Synchronised time of ``all_to_all_single`` calls whose group spans several nodes (context manager).

    ``node_of(global_rank)`` gives a rank's node."""

    def __init__(self, node_of, sync):
        self.node_of, self.sync = node_of, sync
        self.seconds = 0.0
        self.calls = 0
        self._spans: dict = {}
        self._orig = None

    def _crosses(self, group) -> bool:
        key = id(group)
        if key not in self._spans:
            ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
            self._spans[key] = len({self.node_of(r) for r in ranks}) > 1
        return self._spans[key]

    def __enter__(self):
        self._orig = orig = dist.all_to_all_single

        def timed(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            if not self._crosses(group):
                return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            self.sync()
            t0 = time.perf_counter()
            work = orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            if work is not None:
                work.wait()
            self.sync()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return work

        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._orig
        return False
