"""`gptscale estimate --search`: every layout of a model on a cluster, checked the way
`gptscale train` checks it, estimated, and ranked by step time.

A candidate is a set of config overrides (parallel.mode/tp/pp/dp, train.ds_config: the ZeRO
stage and offload target, train.micro_batch and grad_accum at a fixed global batch,
model.activation_checkpointing). It is refused with the one-line reason training would give
(the run config's validators, the template's check against the mode, tensor-parallel groups
that would span nodes on NCCL) or because its peak memory exceeds the device's; the rest are
ranked by the estimated step time (`estimate.step_time`).
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from gptscale import ds_templates, modes
from gptscale.config import RunConfig, tp_groups_span_nodes
from gptscale.errors import ConfigError, UserError
from gptscale.scaling.estimate import GB, Cluster, Estimate, estimate, layout_of
from gptscale.typed import from_dict


@dataclass
class Candidate:
    overrides: dict[str, object]
    estimate: Estimate | None = None
    reason: str | None = None

    def label(self) -> str:
        return " ".join(f"{k.split('.')[-1]}={v}" for k, v in self.overrides.items())


@dataclass
class SearchResult:
    cfg: RunConfig
    cluster: Cluster
    global_batch: int
    candidates: list[Candidate]

    @property
    def feasible(self) -> list[Candidate]:
        fits = [c for c in self.candidates if c.reason is None]
        return sorted(fits, key=lambda c: c.estimate.step.total)

    @property
    def refused(self) -> list[Candidate]:
        return [c for c in self.candidates if c.reason is not None]

    def reasons(self) -> list[tuple[str, int, Candidate]]:
        """Each distinct reason (numbers folded into its kind), how many layouts it refused, and
        its first example."""
        counts: Counter[str] = Counter()
        first: dict[str, Candidate] = {}
        for c in self.refused:
            kind = _reason_kind(c.reason)
            counts[kind] += 1
            first.setdefault(kind, c)
        return [(first[k].reason, n, first[k]) for k, n in counts.most_common()]

    def to_dict(self, top: int = 10) -> dict:
        return {
            "schema": "gptscale.search/1",
            "devices": self.cluster.devices, "global_batch": self.global_batch,
            "candidates": len(self.candidates), "feasible": len(self.feasible),
            "best": [{"overrides": c.overrides, "step_s": c.estimate.step.total,
                      "predicted_mfu": c.estimate.predicted_mfu(), "peak_bytes": c.estimate.worst.peak,
                      "estimate": c.estimate.to_dict()} for c in self.feasible[:top]],
            "refused": [{"reason": reason, "layouts": n, "example": c.overrides} for reason, n, c in self.reasons()],
        }


def _reason_kind(reason: str) -> str:
    """'needs 93.1 GB per device > 80 GB' and 'needs 120.4 GB ...' are one kind of refusal."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: RunConfig, cluster: Cluster, global_batch: int | None = None, tokens: float | None = None,
           templates: list[str] | None = None) -> SearchResult:
    """All layouts of cfg's model on `cluster`, each checked, estimated and (if it fits) timed."""
    missing = [flag for flag, value in (("--devices", cluster.devices), ("--device-memory", cluster.device_memory_gb),
                                        ("--peak-tflops", cluster.peak_tflops)) if value is None]
    if missing:
        raise ConfigError(f"--search needs {', '.join(missing)}: the cluster to lay the model out on")
    devices = cluster.devices
    if global_batch is None:
        p = cfg.parallel
        global_batch = cfg.train.micro_batch * cfg.train.grad_accum * (p.dp or max(devices // (p.tp * p.pp), 1))
    templates = templates or sorted(path.stem for path in ds_templates.TEMPLATE_DIR.glob("*.json"))
    base = cfg.to_dict()
    candidates = []
    for tp, pp in ((tp, pp) for tp in _divisors(devices) for pp in _divisors(devices // tp)):
        dp = devices // (tp * pp)
        micro_batches = [mb for mb in _divisors(global_batch) if global_batch % (mb * dp) == 0] if (
            global_batch % dp == 0) else [None]
        for mode, template, micro_batch, recompute in itertools.product(
                modes.names()[1:], templates, micro_batches, (False, True)):
            overrides = {"parallel.mode": mode, "parallel.tp": tp, "parallel.pp": pp, "parallel.dp": dp,
                         "train.ds_config": template, "train.micro_batch": micro_batch,
                         "train.grad_accum": None if micro_batch is None else global_batch // (micro_batch * dp),
                         "model.activation_checkpointing": recompute}
            candidates.append(_check(base, overrides, cluster, global_batch, tokens))
    return SearchResult(cfg, cluster, global_batch, candidates)


def _check(base: dict, overrides: dict, cluster: Cluster, global_batch: int, tokens: float | None) -> Candidate:
    candidate = Candidate(overrides)
    if overrides["train.micro_batch"] is None:
        candidate.reason = (f"global batch {global_batch} is not divisible by parallel.dp={overrides['parallel.dp']}; "
                            f"choose --global-batch as a multiple of dp")
        return candidate
    try:
        cfg = _apply(base, overrides)  # the run config's own validators
        layout = layout_of(cfg, cluster.devices)  # the DeepSpeed template against the mode, as training checks it
        _check_nodes(cfg, cluster)
        result = estimate(cfg, cluster, tokens=tokens, layout=layout)
    except UserError as err:
        candidate.reason = str(err)
        return candidate
    candidate.estimate = result
    if not result.fits():
        worst = result.worst
        candidate.reason = (f"needs {worst.peak / GB:.1f} GB per device > {cluster.device_memory_gb:g} GB "
                            f"(stage {worst.stage}: model states {worst.model_states / GB:.1f} GB, activations "
                            f"{worst.activations / GB:.1f} GB)")
    return candidate


def _apply(base: dict, overrides: dict) -> RunConfig:
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    return from_dict(RunConfig, data)


def _check_nodes(cfg: RunConfig, cluster: Cluster) -> None:
    """Training's own check that TP groups stay inside a node (an error on GPUs, where NCCL runs)."""
    if cluster.devices > cluster.devices_per_node:
        message = tp_groups_span_nodes(cfg.parallel.tp, cluster.devices_per_node)
        if message is not None:
            raise ConfigError(message)
