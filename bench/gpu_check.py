"""The GPU check, for a session lent a GPU (run through bench/gpu_check.sh; never in CI).

1. Model throughput without DeepSpeed: gptscale's GPT vs transformers' GPT2LMHeadModel of
   the same shape (GPT-2 124M, bf16, batch 8 x 1024, torch fused AdamW), tokens/s and MFU
   against the GPU's bf16 dense peak; and a Llama-style 1.2B shape for a size where MFU
   means something.
2. `gptscale train` itself on the GPU: ZeRO-3, bf16 (fp32 master and accumulation),
   DeepSpeed's fused Adam (JIT-built there), NCCL, synthetic data, 12 steps; tokens/s, MFU
   and peak memory from its metrics.jsonl.
Prints one table. Multi-rank modes (TP, pipeline) need more than one GPU and are not run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptscale import config
from gptscale.scaling.hardware import device_peak_tflops
from gptscale.model.counting import flops_per_token
from gptscale.model.gpt import GPT

ROWS: list[tuple[str, str]] = []


def timed_steps(model, step_fn, steps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def throughput(name: str, model_cfg, hf: bool, batch: int = 8, seq: int = 1024) -> float:
    torch.manual_seed(0)
    if hf:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.block_size,
                                           n_embd=model_cfg.n_embd, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           activation_function="gelu_new", attn_implementation="sdpa"))
    else:
        model = GPT(model_cfg)
    model = model.cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids).loss if hf else model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed_steps(model, step)
    tokens_s = batch * seq / seconds
    peak, _ = device_peak_tflops(None)
    mfu = flops_per_token(model_cfg, seq) * tokens_s / 1e12 / peak
    ROWS.append((name, f"{tokens_s:,.0f} tokens/s, MFU {mfu:.1%}, {torch.cuda.max_memory_allocated() / 1e9:.1f} GB"))
    del model, opt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return tokens_s


def gptscale_train() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "gptscale.cli", "train", "--set", "model.preset=gpt2-124m",
                "--set", "data.synthetic=true", "--set", f"train.out_dir={tmp}/run", "--set", "train.steps=12",
                "--set", "train.micro_batch=8", "--set", "train.precision=bf16", "--set", "train.eval_every=0",
                "--set", "train.eval_batches=1", "--set", "train.sample_tokens=0", "--set", "train.progress=false",
                "--set", "train.save_every=0", "--set", "train.warmup_steps=2"]
        # Only this GPU's kernels in DeepSpeed's JIT build (the image lists many arches).
        major, minor = torch.cuda.get_device_capability()
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}a"}  # the suffix exercises ds_env's fix
        start = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, timeout=420, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "Error" in line] or ["?"]
            ROWS.append(("gptscale train, ZeRO-3 bf16, 1 GPU", f"FAILED (exit {done.returncode}): {errors[-1][:300]}"))
            print(done.stderr[-4000:], file=sys.stderr)
            return
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r][3:]  # after warm-up (the first includes the JIT build)
        tok = sum(r["tokens_per_s"] for r in steps) / len(steps)
        mfu = sum(r["mfu"] for r in steps) / len(steps)
        losses = [r["loss"] for r in rows if "loss" in r]
        first, last = f"{losses[0]:.3f}", losses[-1]
        ROWS.append(("gptscale train, GPT-2 124M, ZeRO-3 bf16, 1 GPU",
                     f"{tok:,.0f} tokens/s, MFU {mfu:.1%}, peak {steps[-1]['peak_mem_gb']:.1f} GB, "
                     f"loss {first} -> {last:.3f}, {wall:.0f} s incl. start-up and JIT build"))


def main() -> None:
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
    gpt2 = config.load(None, ["model.preset=gpt2-124m"]).model
    ours = throughput("gptscale GPT, GPT-2 124M, bf16, no DeepSpeed", gpt2, hf=False)
    theirs = throughput("transformers GPT2LMHeadModel, same shape", gpt2, hf=True)
    ROWS.append(("ratio gptscale / transformers", f"{ours / theirs:.2f}x"))
    llama = config.load(None, ["model.preset=llama-1b", "model.block_size=1024"]).model
    throughput("gptscale GPT, Llama 1.2B shape, bf16, batch 4 x 1024", llama, hf=False, batch=4)
    gptscale_train()
    width = max(len(name) for name, _ in ROWS)
    print("\n| check | result |\n|---|---|")
    for name, value in ROWS:
        print(f"| {name:{width}s} | {value} |")


if __name__ == "__main__":
    main()
