"""Communication accounting: the bytes every torch.distributed call sends, by process group.

Each call is converted to the bytes one rank sends in a ring implementation, the convention
of the NCCL tests and of Korthikanti et al.: an all-gather or reduce-scatter of S bytes
(the whole gathered / reduced tensor) over n ranks sends S (n-1)/n, an all-reduce twice
that, a broadcast S/n (a pipelined tree), a send S. Calls are seen where they are looked
up on `torch.distributed` at call time (gptscale's own collectives, DeepSpeed's comm
layer); `count_step_communication` counts one training step of a run.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

COLLECTIVES = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
               "_reduce_scatter_base", "reduce_scatter", "all_reduce", "broadcast")
POINT_TO_POINT = ("send", "isend")


@dataclass
class Call:
    kind: str  # all_gather, reduce_scatter, all_reduce, broadcast or send
    group: object | None
    ndim: int  # of the tensor each rank contributes: 1 for parameter vectors, >= 2 for activations
    sent: float  # bytes this rank sends
    label: str = ""  # what made the call (see CommCounter.label_methods)


@dataclass
class CommCounter:
    """Records every counted call while `counting` is True (see `installed`)."""

    counting: bool = False
    calls: list[Call] = field(default_factory=list)
    label: str = ""

    @contextlib.contextmanager
    def installed(self):
        """Wrap torch.distributed's collectives for the duration of the block."""
        import torch.distributed as dist

        originals = {name: getattr(dist, name) for name in (*COLLECTIVES, *POINT_TO_POINT) if hasattr(dist, name)}
        for name, fn in originals.items():
            setattr(dist, name, self._wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.counting:
                self.calls.append(_call(name, args, kwargs, self.label))
            return fn(*args, **kwargs)
        return counted

    def label_methods(self, cls: type, names: tuple[str, ...], label: str) -> None:
        """Record the calls made inside `cls`'s methods `names` under `label` (e.g. "p2p" for a
        pipeline's stage-to-stage transfers, apart from the same kinds of call elsewhere)."""
        for name in names:
            method = getattr(cls, name)

            def labelled(obj, *args, _method=method, **kwargs):
                self.label = label
                try:
                    return _method(obj, *args, **kwargs)
                finally:
                    self.label = ""
            setattr(cls, name, labelled)

    def bytes_by_kind(self, group=None) -> dict[str, float]:
        """Bytes sent per kind of call, keyed "<label> <kind>" for labelled calls (in `group`
        only, when given)."""
        out: dict[str, float] = defaultdict(float)
        for call in self.calls:
            if group is None or call.group is group:
                out[f"{call.label} {call.kind}" if call.label else call.kind] += call.sent
        return dict(out)


def _call(name: str, args, kwargs, label: str) -> Call:
    import torch.distributed as dist

    group = kwargs.get("group")
    n = dist.get_world_size(group) if group is not None else dist.get_world_size()
    first = args[0] if args else kwargs.get("tensor", kwargs.get("output_tensor", kwargs.get("output")))
    if name.startswith("reduce_scatter") or name == "_reduce_scatter_base":
        # The reduced tensor is the input (a list of n chunks, or one tensor n times the output).
        first = args[1] if len(args) > 1 else kwargs.get("input", kwargs.get("input_list", first))
    tensors = first if isinstance(first, (list, tuple)) else [first]
    size = sum(t.numel() * t.element_size() for t in tensors)
    ndim = tensors[0].dim()
    kind = name.lstrip("_").replace("_base", "").replace("_into_tensor", "").replace("_tensor", "")
    if name in POINT_TO_POINT:
        return Call("send", group, ndim, float(size), label)
    if name == "broadcast":
        return Call(kind, group, ndim, size / n, label)
    factor = 2 if name == "all_reduce" else 1
    return Call(kind, group, ndim, factor * size * (n - 1) / n if n > 1 else 0.0, label)


def train_counting(counter: CommCounter, overrides: list[str], step: int = 2):
    """Train the run of `overrides` with `counter` counting only during step `step` (0-based;
    the third by default: warm, without the first step's set-up traffic). Returns the Trainer."""
    from gptscale import config
    from gptscale.train.loop import Trainer

    trainer = Trainer(config.load(None, overrides), "none")
    runtime = trainer.runtime
    original_step = runtime.train_step

    def counted_step(batches, at, nonfinite):
        counter.counting = at == step
        try:
            return original_step(batches, at, nonfinite)
        finally:
            counter.counting = False

    runtime.train_step = counted_step
    trainer.run()
    return trainer


def count_step_communication(overrides: list[str], step: int = 2) -> dict:
    """Train the run of `overrides` (every rank calls this) and count step `step` (0-based; the
    third by default: warm, without the first step's set-up traffic). Returns, for this rank:
    tp (bytes sent over its TP group), tp_kinds (the kinds of call there), tp_activation (of
    those, the bytes of tensors with >= 2 dimensions: activations and per-token statistics,
    not parameter vectors), dp (bytes over its DP group), other (every other group)."""
    counter = CommCounter()
    with counter.installed():
        trainer = train_counting(counter, overrides, step)
    tp_group, dp_group = trainer.topo.tp_group.group, trainer.topo.get_data_parallel_group()
    tp_calls = [c for c in counter.calls if c.group is tp_group]
    return {
        "tp": sum(c.sent for c in tp_calls),
        "tp_kinds": sorted({c.kind for c in tp_calls}),
        "tp_activation": sum(c.sent for c in tp_calls if c.ndim >= 2),
        "dp": sum(c.sent for c in counter.calls if c.group is dp_group),
        "other": sum(c.sent for c in counter.calls if c.group not in (tp_group, dp_group)),
    }
