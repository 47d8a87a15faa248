"""Communication accounting: the bytes every torch.distributed call sends, by process group.

Each call is converted to the bytes one rank sends in a ring implementation, the convention
of the NCCL tests and of Korthikanti et al.: an all-gather or reduce-scatter of S bytes
(the whole gathered / reduced tensor) over n ranks sends S (n-1)/n, an all-reduce twice
that, a broadcast S/n (a pipelined tree), a send S. Calls are seen where they are looked
up on `torch.distributed` at call time (gptscale's own collectives, DeepSpeed's comm
layer); `count_step_communication` counts one training step of a run.
"""
from __future__ import annotations

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
    """Records every counted call while `counting` is True (see `process_counter`)."""

    counting: bool = False
    calls: list[Call] = field(default_factory=list)
    label: str = ""

    def install(self) -> None:
        """Wrap torch.distributed's collectives, for good (see `process_counter`)."""
        import torch.distributed as dist

        for name in (*COLLECTIVES, *POINT_TO_POINT):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

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


_installed: list[CommCounter] = []


def process_counter() -> CommCounter:
    """This process's counter, installed once for its life: DeepSpeed's comm layer keeps the
    functions it first looked up, so a counter removed after one run would miss the next's."""
    if not _installed:
        counter = CommCounter()
        counter.install()
        _installed.append(counter)
    return _installed[0]


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
    """Train the run of `overrides` (every rank calls this) and count step `step`. Returns this
    rank's bytes, grouped as `scaling.comm_volume.step_bytes` predicts them, the groups told
    apart by their ranks (DeepSpeed's PipelineEngine makes its own group objects):
    tp (over the TP group: TP's collectives; with sequence parallelism all-gathers too),
    p2p_gather (TP-group all-gathers of flat pieces that a pipeline split over the TP ranks),
    dp (over the DP group), p2p (point-to-point sends), other; plus tp_kinds, tp_activation
    (of tp, the tensors with >= 2 dimensions: activations, per-token statistics) and stage."""
    import torch.distributed as dist

    counter = process_counter()
    counter.calls.clear()
    trainer = train_counting(counter, overrides, step)
    topo = trainer.topo
    tp_ranks, dp_ranks = topo.ranks("tp"), topo.ranks("dp")
    out = {"tp": 0.0, "p2p_gather": 0.0, "dp": 0.0, "p2p": 0.0, "other": 0.0, "tp_activation": 0.0,
           "stage": topo.coords.pp}
    kinds = set()
    for call in counter.calls:
        ranks = sorted(dist.get_process_group_ranks(call.group)) if call.group is not None else None
        if call.kind == "send":
            out["p2p"] += call.sent
        elif ranks == tp_ranks and len(tp_ranks) > 1 and call.kind == "all_gather" and call.ndim == 1:
            out["p2p_gather"] += call.sent
        elif ranks == tp_ranks and len(tp_ranks) > 1:
            out["tp"] += call.sent
            kinds.add(call.kind)
            out["tp_activation"] += call.sent if call.ndim >= 2 else 0.0
        elif ranks == dp_ranks and len(dp_ranks) > 1:
            out["dp"] += call.sent
        else:
            out["other"] += call.sent
    out["tp_kinds"] = sorted(kinds)
    return out
