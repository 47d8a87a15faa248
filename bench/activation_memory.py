"""Activation memory per TP rank, measured, with and without sequence parallelism and with
none / selective / full recompute, against gptscale's estimator and Korthikanti et al.'s
Table 2.

On 4 CPU ranks (gloo), for TP = 1, 2, 4 (the other ranks form further TP groups), a GPT-2
style block in bf16 (Korthikanti's formula assumes 16-bit activations, GELU, LayerNorm,
dropout) runs one forward on a micro-batch; every tensor handed to autograd's saved-tensor
hooks is counted once per storage (parameters excluded). That is what the block keeps for
backward: the activation memory per layer. Compared with:

- `scaling.estimate.layer_activation_bytes` (and for full recompute the block input it
  keeps), gptscale's own tensor-by-tensor count: the ratio should be 1;
- `scaling.formulas.korthikanti_layer_activation_bytes` (Megatron's GPT-3 layer: it stores
  the s x s softmax, 5as/h per sbh, which fused SDPA never materialises, and with sequence
  parallelism keeps the linears' inputs as 1/t shards, gathered again in backward; gptscale
  keeps the gathered input), so the ratio shows what those choices cost or save.

    .venv/bin/python bench/activation_memory.py [--seq 512 --hidden 512 --heads 8 --batch 2 --dropout 0] [--json OUT]
"""
from __future__ import annotations

import argparse
import json

from gptscale.testing.distributed import run_ranks

WORLD = 4


def _measure(shape: dict) -> list[dict]:
    import torch
    import torch.distributed as dist

    from gptscale import config
    from gptscale.model.gpt import Block
    from gptscale.parallel.topology import RankLayout, Topology, TPGroup
    from gptscale.scaling import formulas
    from gptscale.scaling.estimate import PRECISION_BYTES, layer_activation_bytes, layout_of

    rows = []
    s, h, a, b = shape["seq"], shape["hidden"], shape["heads"], shape["batch"]
    for tp in (1, 2, 4):
        for sp in ((False,) if tp == 1 else (False, True)):
            topo = Topology(RankLayout(tp=tp, dp=WORLD // tp, pp=1), dist.get_rank(), sequence_parallel=sp)
            group = topo.tp_group if tp > 1 else TPGroup.single()
            for recompute in ("none", "selective", "full"):
                cfg = config.load(None, [
                    "model.family=gpt2", f"model.n_embd={h}", f"model.n_head={a}", f"model.block_size={s}",
                    "model.vocab_size=512", "model.n_layer=1", f"model.dropout={shape['dropout']}",
                    f"model.activation_checkpointing={recompute}", "data.synthetic=true", f"data.seq_len={s}",
                    f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sp).lower()}", "train.precision=bf16",
                    f"train.micro_batch={b}", "train.ds_config=zero3"])
                torch.manual_seed(0)
                block = Block(cfg.model, group).to(torch.bfloat16).train()
                x = torch.randn(b, s // (tp if sp else 1), h, dtype=torch.bfloat16, requires_grad=True)
                saved: dict[int, int] = {}

                def pack(t):
                    if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
                        storage = t.untyped_storage()
                        saved[storage.data_ptr()] = storage.nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    y = block(x)
                y.float().sum().backward()  # the ranks' collectives in backward must run too
                layout = layout_of(cfg, tp * (WORLD // tp))
                if recompute == "full":  # the block keeps its input; one block is rematerialised in backward
                    estimated = PRECISION_BYTES["bf16"] * s * h * b / (tp if sp else 1)
                else:
                    estimated = layer_activation_bytes(cfg.model, layout)
                korthikanti = formulas.korthikanti_layer_activation_bytes(s, b, h, a, tp, sp, recompute)
                rows.append({"tp": tp, "sequence_parallel": sp, "recompute": recompute, "measured": sum(saved.values()),
                             "estimated": estimated, "korthikanti": korthikanti})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="model.dropout; above 0, torch's CPU attention falls back to its math kernel, which "
                             "keeps the s x s probabilities (the estimator assumes the fused kernel)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    shape = {"seq": args.seq, "hidden": args.hidden, "heads": args.heads, "batch": args.batch, "dropout": args.dropout}
    rows = run_ranks(_measure, WORLD, shape, timeout=900, env={"DS_ACCELERATOR": "cpu"})[0]
    print(f"one GPT-2 block, bf16, s={args.seq} h={args.hidden} a={args.heads} b={args.batch}, dropout {args.dropout}; "
          f"bytes kept for backward per TP rank")
    print(f"{'TP':>3} {'SP':>4} {'recompute':>10} {'measured':>12} {'estimator':>12} {'ratio':>6} "
          f"{'Korthikanti':>12} {'ratio':>6} {'vs TP=1 none':>12}")
    base = next(r["measured"] for r in rows if r["tp"] == 1 and r["recompute"] == "none")
    for r in rows:
        print(f"{r['tp']:>3} {'on' if r['sequence_parallel'] else 'off':>4} {r['recompute']:>10} {r['measured']:>12,} "
              f"{r['estimated']:>12,.0f} {r['measured'] / r['estimated']:>6.3f} {r['korthikanti']:>12,.0f} "
              f"{r['measured'] / r['korthikanti']:>6.3f} {r['measured'] / base:>12.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
