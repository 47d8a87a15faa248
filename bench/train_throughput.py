"""Training throughput: gptscale's GPT vs Hugging Face transformers' GPT2LMHeadModel.

Both models have the same shape and are trained under the same assembled DeepSpeed ZeRO-3
config, on the same number of ranks, on the same synthetic tokens, in one run of this
script; it prints tokens/s, MFU and the ratio ours / theirs (target >= 1.0x).

    .venv/bin/python bench/train_throughput.py [--ranks 2] [--steps 10] [--layers 4 --embd 256]
"""
from __future__ import annotations

import argparse
import time

from gptscale import config
from gptscale.testing.distributed import run_ranks


def _body(kind: str, overrides: list[str], steps: int) -> dict:
    import torch

    from gptscale.train.batches import SyntheticBatches
    from gptscale.runtime.ds_config import assemble
    from gptscale.ds_import import import_deepspeed, on_gpu
    from gptscale.model.counting import flops_per_token
    from gptscale.parallel.topology import Topology

    ds = import_deepspeed()
    ds.init_distributed(dist_backend="gloo")
    cfg = config.load(None, overrides)
    topo = Topology.from_env(cfg.parallel)
    ds_config = assemble(cfg, topo.layout.dp, on_gpu())
    m = cfg.model
    torch.manual_seed(0)
    if kind != "gptscale":  # import before zero.Init patches tensor construction
        from transformers import GPT2Config, GPT2LMHeadModel
    with ds.zero.Init(config_dict_or_path=ds_config, mpu=topo, data_parallel_group=topo.get_data_parallel_group()):
        if kind == "gptscale":
            from gptscale.model.gpt import GPT

            model = GPT(m, topo.tp_group)
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd,
                                               n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                               attn_pdrop=0.0, activation_function="gelu_new"))
    engine, *_ = ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config, mpu=topo)
    data = iter(SyntheticBatches(m.vocab_size, cfg.data.seq_len, cfg.train.micro_batch, 1, topo.coords.dp,
                                 topo.layout.dp, 0))

    def step():
        x, y = next(data)
        loss = engine(x, labels=y) if kind == "gptscale" else engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()

    for _ in range(2):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    tokens = steps * cfg.train.micro_batch * topo.layout.dp * cfg.data.seq_len
    return {"tokens_per_s": tokens / elapsed, "flops_per_token": flops_per_token(m, cfg.data.seq_len)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    overrides = ["model.preset=tiny", "model.vocab_size=4096", f"model.n_layer={args.layers}",
                 f"model.n_embd={args.embd}", f"model.block_size={args.seq_len}", f"data.seq_len={args.seq_len}",
                 "data.synthetic=true", "train.micro_batch=4"]
    import torch

    from gptscale.scaling.hardware import measure_cpu_peak_tflops

    torch.set_num_threads(1)  # as each rank runs
    peak = measure_cpu_peak_tflops(seconds=2.0)  # one denominator for both, so MFUs compare
    results = {}
    for kind in ("gptscale", "transformers"):
        out = run_ranks(_body, args.ranks, kind, overrides, args.steps, timeout=600, env={"DS_ACCELERATOR": "cpu"})
        r = out[0]
        tflops = r["flops_per_token"] * r["tokens_per_s"] / args.ranks / 1e12
        results[kind] = r["tokens_per_s"]
        print(f"{kind:<13} {r['tokens_per_s']:10,.0f} tokens/s   {tflops * 1e3:7.2f} GFLOP/s per rank   "
              f"MFU {tflops / peak:6.1%} (of {peak * 1e3:.1f} GFLOP/s, fp32 matmul on one thread)")
    print(f"ratio gptscale / transformers GPT-2 = {results['gptscale'] / results['transformers']:.2f}x "
          f"({args.ranks} CPU ranks, ZeRO-3, fp32, {args.layers} layers x {args.embd}, seq {args.seq_len})")


if __name__ == "__main__":
    main()
