"""pipe_zero3 vs the PipelineEngine + ZeRO-1 on the same layout: per-rank memory and the
communication volume of one training step, measured and against theory.

PP=2 x DP=2 on 4 CPU ranks (or PP=2 x TP=2 with --tp 2), fp32, an untied Llama-style model,
every parameter partitioned (`stage3_param_persistence_threshold: 0`, so the theory needs no
list of small exceptions).
Memory: the bytes of the tensors each rank keeps between steps for parameters, fp32 master
weights, gradient partitions and Adam states (each storage counted once). Communication:
every torch.distributed call during step 3 is counted on every rank, converted to the bytes
a rank sends in a ring implementation (all-gather / reduce-scatter of S bytes over n ranks:
S (n-1)/n; all-reduce: 2 S (n-1)/n; send: its size). The calls pipe_zero3's stage-to-stage
transfers make (`P2P.send` / `P2P.recv`: the sends, and at TP > 1 the all-gather of the 1/tp
chunks each TP rank sent) are counted apart from ZeRO's and TP's own ("p2p ..." keys); the
counting is gptscale.testing.comm's.

    .venv/bin/python bench/pipe_zero3_memory.py [--layers 4 --embd 256 --tp 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gptscale.testing.distributed import run_ranks

def _measure(overrides: list[str]) -> dict:
    import torch

    from gptscale.runtime.memory import resident_bytes
    from gptscale.runtime.pipe_zero3.p2p import P2P
    from gptscale.testing.comm import process_counter, train_counting

    counter = process_counter()
    counter.label_methods(P2P, ("send", "recv"), "p2p")  # stage-to-stage transfers apart from ZeRO's and TP's
    trainer = train_counting(counter, overrides, step=2)
    runtime = trainer.runtime
    memory = resident_bytes(runtime.engine)
    stage_params = sum(getattr(p, "ds_numel", p.numel()) for p in runtime.engine.module.parameters())
    return {"memory": memory, "comm": counter.bytes_by_kind(), "stage_params": stage_params,
            "stage": trainer.topo.coords.pp, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--tp", type=int, default=1, choices=(1, 2), help="TP size (DP = 2 / TP)")
    args = parser.parse_args()
    m, dp = args.micro_batches, 2 // args.tp
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "zero3_all_partitioned.json"
        template.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                                              "reduce_bucket_size": 50_000_000,
                                                              "stage3_prefetch_bucket_size": 50_000_000},
                                        "steps_per_print": 10 ** 9}))
        model = ["model.preset=tiny-llama", "model.vocab_size=4096", f"model.n_layer={args.layers}",
                 f"model.n_embd={args.embd}", "model.n_head=4", "model.n_kv_head=4", "model.block_size=64",
                 "data.synthetic=true", "data.seq_len=64", "train.micro_batch=2", f"train.grad_accum={m}",
                 "train.steps=3", "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0",
                 "train.progress=false", "train.tensorboard=false", "parallel.pp=2", f"parallel.tp={args.tp}",
                 "parallel.pipe_partition=blocks"]
        runs = {
            "pipe + ZeRO-1": [*model, "parallel.mode=pipe"],
            "pipe_zero3, gather per micro-batch": [*model, "parallel.mode=pipe_zero3", f"train.ds_config={template}"],
            "pipe_zero3, gather per step": [*model, "parallel.mode=pipe_zero3", f"train.ds_config={template}",
                                            "parallel.pipe_zero3_gather=step"],
        }
        results = {}
        for name, overrides in runs.items():
            results[name] = run_ranks(_measure, 4, [*overrides, f"train.out_dir={tmp}/{len(results)}"], timeout=900,
                                      env={"DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1", "OMP_NUM_THREADS": "1"})
    report(results, m, dp, args)


def report(results: dict, m: int, dp: int, args) -> None:
    act = 2 * 64 * args.embd * 4  # one micro-batch's activation (or its gradient): micro_batch x seq x d x fp32
    tp = args.tp
    print(f"PP=2 x TP={tp} x DP={dp}, {args.layers} blocks d={args.embd} vocab 4096 (untied), fp32, {m} "
          f"micro-batches; rank 0 (stage 0) and rank 2 (stage 1)")
    base = {}
    for name, ranks in results.items():
        for rank in (0, 2):
            r = ranks[rank]
            psi = r["stage_params"]
            mem = r["memory"]
            if name.startswith("pipe +"):
                base[rank] = mem["total"]
            p2p = {k.removeprefix("p2p "): v for k, v in r["comm"].items() if k.startswith("p2p ")}
            other = {k: v for k, v in r["comm"].items() if not k.startswith("p2p ")}
            gathers = sum(v for k, v in other.items() if "all_gather" in k)
            scatters = sum(v for k, v in other.items() if "reduce_scatter" in k)
            # Sends between stages: pipe_zero3's P2P, or the PipelineEngine's own send calls.
            sent = p2p.get("send", 0) + other.get("send", 0)
            chunks = sum(v for k, v in p2p.items() if "all_gather" in k)
            share = psi * 4 * (dp - 1) / dp
            if "micro-batch" in name:
                # Forward and backward of every micro-batch; except on the last stage, whose
                # backward follows its forward at once, so ZeRO-3 still holds the layers (reuse).
                theory_gather = (m if r["stage"] == 1 else 2 * m) * share
            elif "per step" in name:
                theory_gather = share
            else:
                theory_gather = 0.0
            # Each stage sends m tensors (activations forward, or their gradients back) and
            # receives m. TP ranks hold identical copies: each sends its 1/tp chunk, the
            # receiving TP group all-gathers the rest (a ring moves (tp-1)/tp of it per rank).
            p2p_line = f"p2p sent {sent:>9,.0f} B (theory m x act / tp = {m * act // tp:,})"
            if name.startswith("pipe_zero3"):
                p2p_line += f" + TP all-gather of the chunks {chunks:>9,.0f} B (theory {m * act * (tp - 1) // tp:,})"
            print(f"{name:38s} stage {r['stage']}: {psi:>9,} params | memory {mem['total']:>11,} B "
                  f"({mem['total'] / psi:5.2f} B/param; {mem['total'] / base[rank]:.2f}x ZeRO-1) | "
                  f"all-gather {gathers:>12,.0f} B (theory {theory_gather:>12,.0f}) | reduce-scatter "
                  f"{scatters:>12,.0f} B (theory m x Psi x 4 x (dp-1)/dp = {m * share:>12,.0f}) | "
                  f"all-reduce {other.get('all_reduce', 0):>10,.0f} B | {p2p_line}")
            print(f"{'':38s}   parts: {json.dumps({k: v for k, v in mem.items() if k != 'total'})}")

if __name__ == "__main__":
    main()
