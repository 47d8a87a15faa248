"""Per-rank memory of LoRA against full fine-tuning of the same model under ZeRO-3.

The same GPT-2 (gpt2-350m's shape, 355M parameters, fp32) fine-tuned for 3 steps at zero3
DP=2 on 2 CPU ranks, once with finetune.method=full and once with lora (rank 16 on qkv,
proj, up, down), from the same starting weights and SFT examples. Each rank reports its peak
resident memory (VmHWM, the whole process: Python, torch, DeepSpeed, the model) and what its
optimizer holds: the fp32 partitions it updates and Adam's two moments of them (the frozen
base of a LoRA run has neither; it stays ZeRO-3-partitioned in 16-bit-or-fp32 weights only).

    .venv/bin/python bench/finetune_memory.py [--preset gpt2-350m] [--rank 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = {"DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1", "OMP_NUM_THREADS": "1"}


def rank_body(overrides):
    import torch

    from gptscale import config
    from gptscale.train.loop import Trainer
    from gptscale.train.tasks import FineTuning

    cfg = config.load(None, overrides)
    trainer = Trainer(cfg, "none", FineTuning(cfg))
    started = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - started
    zero = trainer.runtime.engine.optimizer
    moments = sum(t.numel() * t.element_size() for state in zero.optimizer.state.values()
                  for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    masters = sum(t.numel() * t.element_size() for t in zero.fp32_partitioned_groups_flat)
    params = trainer.runtime.canonical_parameters()
    trained = sum(p.ds_numel for p in params.values() if p.requires_grad)
    total = sum(p.ds_numel for p in params.values())
    hwm = int([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]) * 1024
    return {"vmhwm": hwm, "optimizer_bytes": moments + masters, "trained": trained, "total": total, "seconds": seconds}


def sft_data(root: Path) -> Path:
    from gptscale.data.sft import prepare_sft
    from gptscale.data.sources import embedded_documents
    from gptscale.data.tokenizer import train_tokenizer

    train_tokenizer([text for _, text in embedded_documents("pydoc")][:100], 400, root / "tok")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(64)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_sft([str(root / "sft.jsonl")], root / "tok", root / "sft", seq_len=32, val_inputs=[str(root / "sft.jsonl")],
                progress=False)
    return root / "sft"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-350m")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    os.environ.update(ENV)
    from gptscale.testing.distributed import run_ranks
    from tests.parallel.training import save_init_weights

    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        root = Path(tmp)
        data = sft_data(root)
        model = [f"model.preset={args.preset}"]
        init = save_init_weights(root / "init.safetensors", model)
        common = [*model, f"data.path={data}", "data.seq_len=32", "train.steps=3", "train.micro_batch=2",
                  f"train.init_from={init}", "train.eval_every=0", "train.sample_tokens=0", "train.progress=false",
                  "train.tensorboard=false", "finetune.eval_answers=0", f"finetune.lora.rank={args.rank}",
                  "finetune.lora.targets=qkv,proj,mlp"]
        rows = {}
        for method in ("full", "lora"):
            overrides = [*common, f"finetune.method={method}", f"train.out_dir={root / method}"]
            rows[method] = run_ranks(rank_body, 2, overrides, timeout=3600, env=ENV)
        full, lora = rows["full"], rows["lora"]
        print(f"{args.preset}: {full[0]['total']:,} parameters; LoRA rank {args.rank} trains {lora[0]['trained']:,} "
              f"({lora[0]['trained'] / lora[0]['total']:.2%}); zero3 DP=2, fp32, 2 CPU ranks, 3 steps")
        print("| method | rank | peak RSS (VmHWM) | optimizer state (fp32 partitions + Adam moments) | 3 steps |")
        print("|---|---|---|---|---|")
        for method, ranks in rows.items():
            for r, row in enumerate(ranks):
                print(f"| {method} | {r} | {row['vmhwm'] / 2**30:.2f} GiB | {row['optimizer_bytes'] / 2**20:,.1f} MiB | "
                      f"{row['seconds']:.1f} s |")
        print(f"LoRA / full, rank 0: peak RSS {lora[0]['vmhwm'] / full[0]['vmhwm']:.2f}x, optimizer state "
              f"{lora[0]['optimizer_bytes'] / full[0]['optimizer_bytes']:.4f}x")


if __name__ == "__main__":
    main()
