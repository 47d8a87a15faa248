"""`gptscale estimate`: parameters, FLOPs, memory per device, bubble and time on paper, and
`--search` for the best layout of a cluster."""
from __future__ import annotations

import argparse
import json

from gptscale.cli.options import add_config_options, positive_int

ESTIMATE_HELP = """\
Numbers on paper for a run config, before any device is spent: exact parameters (whole, per TP
rank, per pipeline stage), training FLOPs per token and per step (6N + 12LHQT; with the
recomputed forward), memory per device (parameters, gradients, fp32 master weights and Adam
states as DeepSpeed keeps them on the device, the host or NVMe; activations, gathered ZeRO-3
layers, buckets, logits), the pipeline bubble, a step time from a compute + communication model,
and the time and device-hours to train --tokens.

  gptscale estimate --config configs/tiny.yaml
  gptscale estimate --set model.preset=llama-70b --set parallel.tp=8 --set parallel.pp=4 \\
      --set train.precision=bf16 --devices 256 --device-memory 80 --peak-tflops 989 --tokens 2e12
  gptscale estimate --set model.preset=llama-70b --set train.precision=bf16 --devices 64 \\
      --device-memory 80 --peak-tflops 989 --search

--search lists the layouts (mode, tp, pp, dp, DeepSpeed template: ZeRO stage and offload,
micro-batch, gradient accumulation, recompute) that `gptscale train` would accept and that fit,
fastest first by the step-time model, keeping the global batch; and why the others do not.
Memory in GB = 1e9 bytes. The step-time model and every formula's source: README, "Scaling studies".
"""


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--devices", type=positive_int, help="devices (ranks) in the job; default: the config's tp*pp*dp")
    g.add_argument("--devices-per-node", type=positive_int, default=8)
    g.add_argument("--device-memory", type=float, metavar="GB", help="memory per device, GB (e.g. 80)")
    g.add_argument("--peak-tflops", type=float, metavar="T",
                   help="dense peak TFLOP/s per device at the run's precision (H100/H200 bf16: 989, A100: 312)")
    g.add_argument("--gemm-efficiency", type=float, default=0.6,
                   help="share of the peak the matmuls reach in the step-time model (default 0.6)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation for the time to train (overrides the model)")
    g.add_argument("--achieved-tflops", type=float,
                   help="hardware TFLOP/s per device achieved, recompute counted, as papers report (time to train)")
    g.add_argument("--tokens", type=float, help="token budget for time to train and device-hours (e.g. 2e12)")
    g.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per device within a node (NVLink)")
    g.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per device between nodes (NIC)")
    g.add_argument("--pcie-gbps", type=float, default=25.0, help="GB/s host <-> device (offload)")
    g.add_argument("--nvme-gbps", type=float, default=3.0, help="GB/s NVMe per device (ZeRO-Infinity)")
    g.add_argument("--overlap", type=float, default=0.0,
                   help="share of data-parallel communication hidden behind compute (0: none, an upper bound)")


def _cluster(args: argparse.Namespace):
    from gptscale.scaling.estimate import Cluster

    return Cluster(devices=args.devices, device_memory_gb=args.device_memory, peak_tflops=args.peak_tflops,
                   devices_per_node=args.devices_per_node, gemm_efficiency=args.gemm_efficiency, mfu=args.mfu,
                   achieved_tflops=args.achieved_tflops, intra_node_gbps=args.intra_node_gbps,
                   inter_node_gbps=args.inter_node_gbps, pcie_gbps=args.pcie_gbps, nvme_gbps=args.nvme_gbps,
                   overlap=args.overlap)


def cmd_estimate(args: argparse.Namespace) -> int:
    from gptscale import config
    from gptscale.errors import ConfigError
    from gptscale.scaling import report

    if args.tokens is not None and not args.tokens > 0:
        raise ConfigError(f"--tokens={args.tokens} must be > 0")
    cfg = config.load(args.config, args.set)
    cluster = _cluster(args)
    if args.search:
        from gptscale.scaling.search import search

        result = search(cfg, cluster, global_batch=args.global_batch, tokens=args.tokens)
        print(json.dumps(result.to_dict(args.top), indent=1) if args.json else report.search_table(result, args.top))
        return 0 if result.feasible else 2
    from gptscale.scaling.estimate import estimate

    result = estimate(cfg, cluster, tokens=args.tokens)
    print(json.dumps(result.to_dict(), indent=1) if args.json else report.estimate_text(result))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("estimate", help="parameters, FLOPs, memory per device, bubble, time to train; --search layouts",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=ESTIMATE_HELP)
    add_config_options(p)
    _cluster_options(p)
    p.add_argument("--search", action="store_true", help="rank the layouts that fit the cluster (needs --devices)")
    p.add_argument("--global-batch", type=positive_int,
                   help="--search: sequences per step to keep (default: the config's micro_batch*grad_accum*dp)")
    p.add_argument("--top", type=positive_int, default=10, help="--search: feasible layouts to list (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON (schema: README, 'Scaling studies')")
    p.set_defaults(func=cmd_estimate)
