"""`gptscale selftest`: the tiny presets at TP=N on N local CPU ranks vs the dense model."""
from __future__ import annotations

import torch.distributed as dist

from gptscale.config import ModelConfig, ParallelConfig
from gptscale.parallel.topology import Topology
from gptscale.testing.distributed import run_ranks
from gptscale.testing.parity import parity_ok, tp_parity

PRESETS = ("tiny", "tiny-llama")


def _rank_body() -> dict:
    topo = Topology.from_env(ParallelConfig(tp=dist.get_world_size()))
    return {name: tp_parity(ModelConfig.from_preset(name), topo.tp_group, seq_len=32) for name in PRESETS}


def run_selftest(ranks: int, timeout: float = 300.0) -> bool:
    """Print one line per preset and rank; True when every rank of every preset passes."""
    for name in PRESETS:
        ModelConfig.from_preset(name).check_tensor_parallel(ranks)  # a clear error before any process starts
    print(f"selftest: TP={ranks} on {ranks} CPU rank(s) (gloo) vs the dense model, fp32, tolerance 1e-5")
    results = run_ranks(_rank_body, ranks, timeout=timeout)
    header = f"{'preset':<12}{'rank':>5}{'logits':>11}{'loss':>11}{'grads':>11}  {'greedy':<7}{'sampled':<8}verdict"
    print(header)
    ok = True
    for name in PRESETS:
        for rank, per_rank in enumerate(results):
            r = per_rank[name]
            passed = parity_ok(r)
            ok &= passed
            print(f"{name:<12}{rank:>5}{r['logits']:>11.2e}{r['loss']:>11.2e}{r['grads']:>11.2e}  "
                  f"{'same' if r['greedy_same'] else 'DIFF':<7}{'agree' if r['sampled_agree'] else 'DIFF':<8}"
                  f"{'PASS' if passed else 'FAIL'}")
    print("selftest:", "PASS" if ok else "FAIL")
    return ok
