"""`gptscale estimate` against real runs: model states, activations, peak memory, step time.

Each run is a real `Trainer` on CPU ranks (gloo, DeepSpeed 0.19): zero3 at DP=1/2/4, pipe
and pipe_zero3 at PP=2, in fp32 and bf16, on an untied Llama-style model. Per run, rank 0
(stage 0) reports:

- resident bytes (parameters, gradients, fp32 master weights, Adam states) after the last
  step, from the tensors DeepSpeed's optimizer holds (runtime/memory.py), against the
  estimate: they must be equal;
- activation bytes one micro-batch's forward saves for backward (every tensor handed to
  autograd's saved-tensor hooks, each storage once, parameters and their views excluded),
  against the estimate's activations per micro-batch (blocks x per block, the ends, logits);
- peak RSS of the rank, against the RSS it had when its engine was built, minus the model
  states it held then, plus the estimated peak (model states and a step's activations,
  logits, gathered ZeRO-3 layers, buckets, whole ZeRO-0/1 gradients);
- the median step time (steps 2..N), against the step-time model fed with this process's
  measured fp32 matmul rate (gemm efficiency 1) and gloo's measured all-reduce bandwidth.

Also DeepSpeed's own `estimate_zero3_model_states_mem_needs` for the zero3 runs.

    .venv/bin/python bench/estimate_vs_measured.py [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from gptscale import config
from gptscale.testing.distributed import run_ranks

MODEL = ["model.preset=tiny-llama", "model.vocab_size=4096", "model.n_layer=4", "model.n_embd=256",
         "model.n_head=4", "model.n_kv_head=2", "model.ffn_hidden=704", "model.block_size=128",
         "data.synthetic=true", "data.seq_len=128", "train.micro_batch=2", "train.steps=6",
         "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "train.progress=false",
         "train.tensorboard=false", "train.log_every=1"]
RUNS = {
    "zero3 DP=1": (1, ["parallel.mode=zero3"]),
    "zero3 DP=2": (2, ["parallel.mode=zero3"]),
    "zero3 DP=4": (4, ["parallel.mode=zero3"]),
    "pipe PP=2": (2, ["parallel.mode=pipe", "parallel.pp=2", "train.grad_accum=4"]),
    "pipe_zero3 PP=2": (2, ["parallel.mode=pipe_zero3", "parallel.pp=2", "train.grad_accum=4"]),
}


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _gloo_bandwidth() -> float:
    """Bytes/s one rank sends in a ring all-reduce of 16 MB (gloo, this machine)."""
    import time

    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    if n == 1:
        return float("inf")
    x = torch.ones(4 << 20)
    dist.all_reduce(x)
    start = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(x)
    elapsed = (time.perf_counter() - start) / 3
    return 2 * x.numel() * 4 * (n - 1) / n / elapsed


def _measure(overrides: list[str]) -> dict:
    import resource

    import torch

    from gptscale.runtime.memory import resident_bytes
    from gptscale.scaling.hardware import measure_cpu_peak_tflops
    from gptscale.train.loop import Trainer

    trainer = Trainer(config.load(None, overrides), "none")
    rss_built = _rss_bytes()  # the engine exists; no step has run
    states_built = resident_bytes(trainer.runtime.engine)["total"]  # Adam's states come with the first step
    runtime = trainer.runtime
    saved: dict[int, int] = {}
    first = {"done": False}
    module = runtime.engine.module

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    original_forward = module.forward

    def forward_recording(*args, **kwargs):
        if first["done"]:
            return original_forward(*args, **kwargs)
        first["done"] = True  # the first micro-batch's forward only
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return original_forward(*args, **kwargs)

    module.forward = forward_recording
    trainer.run()
    result = {"resident": resident_bytes(runtime.engine), "activations": sum(saved.values()),
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_built": rss_built, "states_built": states_built,
              "stage": trainer.topo.coords.pp, "gemm_tflops": measure_cpu_peak_tflops(), "link": _gloo_bandwidth()}
    if trainer.is_writer:
        records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        result["step_times"] = [r["step_time_s"] for r in records if "step_time_s" in r]
    return result


def _estimate(overrides: list[str], world: int, measured: dict):
    from gptscale.scaling.estimate import Cluster, estimate

    cfg = config.load(None, overrides)
    bandwidth_gbps = min(measured["link"], 1e12) / 1e9
    cluster = Cluster(devices=world, peak_tflops=measured["gemm_tflops"], gemm_efficiency=1.0,
                      intra_node_gbps=bandwidth_gbps, inter_node_gbps=bandwidth_gbps, devices_per_node=world)
    return estimate(cfg, cluster)


def _deepspeed_estimate(e) -> int | None:
    """DeepSpeed's estimate_zero3_model_states_mem_needs (no offload) for the same model and
    ranks: its device bytes minus its largest-layer term, i.e. its 18 bytes/parameter share."""
    if e.layout.zero_stage != 3 or e.layout.pp != 1:
        return None
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total = sum(e.stages[0].numels)
    _, gpu, largest = estimate_zero3_model_states_mem_needs(total, e.stages[0].largest_module,
                                                           num_gpus_per_node=e.layout.dp, num_nodes=1,
                                                           cpu_offload=False, cpu_offload_params=False)
    return gpu - largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--only", default="", help="run only the runs whose name contains this")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            for name, (world, extra) in RUNS.items():
                if args.only not in name:
                    continue
                overrides = [*MODEL, *extra, f"train.precision={precision}", f"train.out_dir={tmp}/{len(rows)}"]
                ranks = run_ranks(_measure, world, overrides, timeout=900,
                                  env={"DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1", "OMP_NUM_THREADS": "1"})
                measured = ranks[0]
                e = _estimate(overrides, world, measured)
                mem = e.memory[0]
                in_flight = min(e.layout.pp, e.layout.grad_accum) if e.layout.pp > 1 else 1
                rows.append({
                    "run": f"{name} {precision}", "world": world,
                    "resident": measured["resident"],
                    "estimated": {"parameters": mem.parameters, "gradients": mem.gradients,
                                  "master_weights": mem.master_weights, "optimizer_states": mem.optimizer_states,
                                  "total": mem.model_states},
                    "deepspeed_estimate": _deepspeed_estimate(e),
                    "activations": measured["activations"], "estimated_activations": (mem.activations + mem.logits) / in_flight,
                    "peak_rss": measured["peak_rss"], "estimated_peak": mem.peak,
                    # the RSS a rank should peak at: what it held when built, plus what the estimate says
                    # comes on top of the model states already there
                    "expected_peak_rss": measured["rss_built"] - measured["states_built"] + mem.peak,
                    "step_s": statistics.median(measured["step_times"][1:]), "estimated_step_s": e.step.total,
                })
                print(_row_text(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _row_text(r: dict) -> str:
    res, est = r["resident"], r["estimated"]
    exact = all(res[k] == est[k] for k in ("parameters", "gradients", "master_weights", "optimizer_states"))
    ds = r["deepspeed_estimate"]
    ds_text = "" if ds is None else f" | DeepSpeed's estimator {ds:,}"
    return (f"{r['run']:<22} model states measured {res['total']:>11,} estimated {est['total']:>11,} "
            f"{'EXACT' if exact else 'DIFFERENT ' + str({k: (res[k], est[k]) for k in est})}{ds_text}\n"
            f"{'':<22} activations/micro-batch measured {r['activations']:>11,} estimated "
            f"{r['estimated_activations']:>11,.0f} ({r['estimated_activations'] / r['activations']:.3f}x) | "
            f"peak RSS {r['peak_rss'] / 1e6:.0f} MB vs {r['expected_peak_rss'] / 1e6:.0f} MB "
            f"({r['expected_peak_rss'] / r['peak_rss']:.2f}x) | "
            f"step {r['step_s']:.3f} s vs {r['estimated_step_s']:.3f} s ({r['estimated_step_s'] / r['step_s']:.2f}x)")


if __name__ == "__main__":
    main()
