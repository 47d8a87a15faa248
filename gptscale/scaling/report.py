"""Text for `gptscale estimate` and `--search`: what a reader scans first, numbers aligned."""
from __future__ import annotations

from gptscale.scaling.estimate import GB, Estimate, Memory
from gptscale.scaling.search import SearchResult


def human(n: float) -> str:
    """1350400 -> '1.35M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _gb(n: float) -> str:
    return f"{n / GB:10.3f} GB"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.1f} s"


def _memory_lines(mem: Memory) -> list[str]:
    lines = [f"  resident between steps (DeepSpeed's optimizer): {_gb(mem.model_states)}"]
    for name in ("parameters", "gradients", "master_weights", "optimizer_states"):
        lines.append(f"    {name:<26}{_gb(getattr(mem, name))}")
    lines.append(f"  added during a step:{'':>27}{_gb(mem.peak - mem.model_states)}")
    for name in ("activations", "logits", "gathered_parameters", "persistent_parameters", "whole_gradients", "buckets"):
        if getattr(mem, name):
            lines.append(f"    {name:<26}{_gb(getattr(mem, name))}")
    lines.append(f"  peak on the device{'':>29}{_gb(mem.peak)}")
    for where, parts in (("host memory", mem.host), ("NVMe", mem.nvme)):
        if parts:
            lines.append(f"  on {where}: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in parts.items()))
    return lines


def estimate_text(e: Estimate) -> str:
    d, lay, c = e.to_dict(), e.layout, e.cluster
    p = d["parameters"]
    out = [f"layout: {lay.mode}, tp={lay.tp} pp={lay.pp} dp={lay.dp} ({lay.devices} devices), "
           f"{lay.template} (ZeRO stage {lay.zero_stage}, offload parameters: {lay.offload_params}, optimizer: "
           f"{lay.offload_optimizer}), {lay.precision}, micro-batch {lay.micro_batch} x {lay.grad_accum} x seq "
           f"{lay.seq_len}, recompute {lay.recompute}",
           f"parameters: {p['total']:,} ({human(p['total'])}); matmul {p['matmul']:,}; per TP rank {p['per_tp_rank']:,}"]
    if lay.pp > 1:
        out.append("  per stage per TP rank: " + ", ".join(f"{n:,}" for n in p["per_stage_per_tp_rank"]))
    f = d["flops"]
    out.append(f"FLOPs per token: {f['model_per_token']:.4g} model (6N + 12LHQT), {f['hardware_per_token']:.4g} "
               f"executed (recompute: {lay.recompute}); per step ({f['tokens_per_step']:,} tokens): {f['model_per_step']:.4g}")
    worst = e.worst
    where = f" (stage {worst.stage} of {lay.pp}, the fullest)" if lay.pp > 1 else ""
    out.append(f"memory per device{where}:")
    out.extend(_memory_lines(worst))
    if c.device_memory_gb is not None:
        verdict = "fits" if e.fits() else "does NOT fit"
        out.append(f"  {verdict} in {c.device_memory_gb:g} GB")
    if lay.pp > 1:
        out.append(f"pipeline bubble: {e.bubble_fraction:.1%} of a step (1F1B, {lay.pp} stages, "
                   f"{lay.grad_accum} micro-batches)")
    if e.step is not None:
        s = e.step
        out.append(f"step time (model, {c.peak_tflops:g} TFLOP/s peak x {c.gemm_efficiency:g}): {s.total:.4g} s = "
                   f"compute {s.compute:.3g} + bubble {s.bubble:.3g} + TP {s.tensor_parallel:.3g} + DP "
                   f"{s.data_parallel:.3g} + PP {s.pipeline_p2p:.3g} + offload {s.offload:.3g}; "
                   f"MFU {e.predicted_mfu():.1%}")
    train = d["train"]
    if train and train["seconds"] is not None:
        out.append(f"to train {train['tokens']:.4g} tokens ({train['steps']:,} steps): {_duration(train['seconds'])}, "
                   f"{train['device_hours']:,.0f} device-hours")
    elif train:
        out.append("time to train: give --peak-tflops (with --mfu or the step-time model) or --achieved-tflops")
    return "\n".join(out)


def search_table(result: SearchResult, top: int) -> str:
    c = result.cluster
    feasible = result.feasible
    out = [f"{len(result.candidates)} layouts of {result.cfg.model.n_layer} layers x d={result.cfg.model.n_embd} on "
           f"{c.devices} devices ({c.devices_per_node} per node, {c.device_memory_gb:g} GB, {c.peak_tflops:g} "
           f"TFLOP/s), global batch {result.global_batch} sequences: {len(feasible)} feasible"]
    if feasible:
        out.append(f"{'#':>3} {'mode':<11}{'tp':>3}{'pp':>4}{'dp':>5} {'template':<14}{'mb':>4}{'ga':>5}{'recomp':>7}"
                   f"{'peak GB':>9}{'step s':>9}{'MFU':>7}")
        for rank, cand in enumerate(feasible[:top], start=1):
            o, e = cand.overrides, cand.estimate
            out.append(f"{rank:>3} {o['parallel.mode']:<11}{o['parallel.tp']:>3}{o['parallel.pp']:>4}"
                       f"{o['parallel.dp']:>5} {o['train.ds_config']:<14}{o['train.micro_batch']:>4}"
                       f"{o['train.grad_accum']:>5}{e.layout.recompute:>7}{e.worst.peak / GB:>9.1f}"
                       f"{e.step.total:>9.3g}{e.predicted_mfu():>7.1%}")
        best = feasible[0].overrides
        out.append("best as overrides: " + " ".join(f"--set {k}={v}" for k, v in best.items()))
    out.append("refused (layouts, first example):")
    for reason, count, cand in result.reasons():
        out.append(f"  {count:>5} x {reason}   [{cand.label()}]")
    if not feasible:
        out.append("no layout fits: more devices, more memory per device, offload (train.ds_config=zero3_offload / "
                   "zero3_nvme) or a smaller model")
    return "\n".join(out)
