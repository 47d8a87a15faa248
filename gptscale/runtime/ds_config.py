"""Assemble the DeepSpeed config from a template (DeepSpeed-only sections) and the run config
(every number that the run config owns). Nothing has to agree by hand.

Which template a run uses and whether its ZeRO stage suits the run mode is decided in
`gptscale.ds_templates` (torch-free, shared with the estimator); this module adds the numbers.
"""
from __future__ import annotations

import copy
import os

from gptscale.config import RunConfig
from gptscale.ds_templates import TEMPLATE_DIR, load_json, load_template
from gptscale.launch import job_tag


def _substitute(node, values: dict[str, str]):
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace("${" + key + "}", value)
    return node


def assemble(cfg: RunConfig, dp_size: int, on_gpu: bool, template: dict | None = None) -> dict:
    """The complete DeepSpeed config for this run on `dp_size` data-parallel replicas, from its
    template (`load_template(cfg)` unless already loaded)."""
    t = cfg.train
    template = load_template(cfg) if template is None else template
    # A folder per job: two jobs sharing a node would otherwise swap to the same file names.
    ds = _substitute(copy.deepcopy(template), {"nvme_path": os.path.join(t.nvme_path, f"gptscale-{job_tag()}")})
    offloads_optimizer = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    ds.update({
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay,
            # Without CUDA and without offload, DeepSpeed's fused Adam is unavailable: use torch's.
            **({} if on_gpu or offloads_optimizer else {"torch_adam": True})}},
    })
    # DeepSpeed's throughput timer synchronizes the device at each forward and each step (two
    # host syncs per micro-batch); gptscale times its steps itself. Off unless a template asks.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    zero = ds.get("zero_optimization", {})
    if cfg.lora is not None and "leaf_module" in zero:
        # Under ZeRO-3 leaf modules (one gather per block instead of one per linear) DeepSpeed
        # 0.19 releases a LoRA block's frozen base weights before their backward runs
        # (measured: "size of tensor a (0) must match"); LoRA runs keep per-module hooks.
        ds["zero_optimization"] = {k: v for k, v in zero.items() if k != "leaf_module"}
    if cfg.parallel.sequence_parallel and "pipeline" in ds:
        # DeepSpeed's activation partitioning sends 1/tp of a tensor it assumes every TP rank
        # holds whole; under sequence parallelism each rank holds its own slice, sent whole.
        ds["pipeline"] = {**ds["pipeline"], "pipe_partitioned": False, "grad_partitioned": False}
    if t.precision != "fp32":
        ds.update(load_json(TEMPLATE_DIR / "precision" / f"{t.precision}.json", "precision template"))
    return ds
