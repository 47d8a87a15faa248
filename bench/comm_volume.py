"""Bytes one training step sends, measured at every torch.distributed call, against
`gptscale.scaling.comm_volume.step_bytes` (the theory tests/parallel/test_comm_volume.py
asserts): zero3 TP x ZeRO-3 DP (with and without sequence parallelism) and pipe (DP, and
TP x PP), on 4 gloo CPU ranks, per rank and group.

    .venv/bin/python bench/comm_volume.py [--layers 4 --embd 128 --seq 64]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gptscale import config
from gptscale.scaling.comm_volume import step_bytes
from gptscale.testing.distributed import run_ranks


def _count(runs):
    from gptscale.testing.comm import count_step_communication

    return [count_step_communication(overrides, step=2) for overrides in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "zero3_all_partitioned.json"
        template.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                        "steps_per_print": 10 ** 9}))
        model = ["model.preset=tiny-llama", "model.vocab_size=1024", f"model.n_layer={args.layers}",
                 f"model.n_embd={args.embd}", "model.n_head=4", "model.n_kv_head=2", f"model.block_size={args.seq}",
                 "data.synthetic=true", f"data.seq_len={args.seq}", "train.steps=3", "train.grad_accum=4",
                 "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "train.progress=false",
                 "train.tensorboard=false"]
        zero3 = ["parallel.tp=2", "train.micro_batch=2", f"train.ds_config={template}"]
        runs = {"zero3 tp2 dp2": zero3, "zero3 tp2 dp2 SP": [*zero3, "parallel.sequence_parallel=true"],
                "pipe pp2 dp2": ["parallel.pp=2", "train.micro_batch=2"],
                "pipe tp2 pp2": ["parallel.pp=2", "parallel.tp=2", "train.micro_batch=4"]}
        overrides = {name: [*model, *extra, f"train.out_dir={tmp}/{i}"] for i, (name, extra) in enumerate(runs.items())}
        results = run_ranks(_count, 4, list(overrides.values()), timeout=900, env={"DS_ACCELERATOR": "cpu"})
    print(f"llama {args.layers} blocks d={args.embd} seq {args.seq}, fp32, 4 micro-batches; bytes one rank sends in "
          f"step 3 (measured / theory)")
    for index, (name, ov) in enumerate(overrides.items()):
        cfg = config.load(None, ov)
        dp = 4 // (cfg.parallel.tp * cfg.parallel.pp)
        for rank in (0, 3):
            measured = results[rank][index]
            theory = step_bytes(cfg, dp, measured["stage"])
            cells = [f"{g} {measured[g]:>10,.0f} / {theory[g]:>10,.0f}"
                     + (f" = {measured[g] / theory[g]:.4f}" if theory[g] else "       ")
                     for g in ("tp", "dp", "p2p", "p2p_gather")]
            print(f"{name:18s} rank {rank}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
