"""`gptscale presets`, `info`, `selftest`: what a configuration is, before anything runs."""
from __future__ import annotations

import argparse

from gptscale.cli.options import add_config_options, non_negative_float, positive_int


def cmd_presets(args: argparse.Namespace) -> int:
    from gptscale.config import ModelConfig
    from gptscale.model.counting import count_parameters, flops_per_token
    from gptscale.presets import preset_names
    from gptscale.scaling.report import human

    print(f"{'preset':<12}{'family':<7}{'layers':>7}{'d_model':>8}{'heads':>7}{'kv':>5}{'ffn':>7}"
          f"{'vocab':>8}{'context':>8}{'params':>10}{'GFLOP/token':>13}")
    for name in preset_names():
        c = ModelConfig.from_preset(name)
        print(f"{name:<12}{c.family:<7}{c.n_layer:>7}{c.n_embd:>8}{c.n_head:>7}{c.n_kv_head:>5}{c.ffn_hidden:>7}"
              f"{c.vocab_size:>8}{c.block_size:>8}{human(count_parameters(c).total):>10}"
              f"{flops_per_token(c) / 1e9:>13.3f}")
    print("GFLOP/token: training (forward + backward) at the full context, 6N + 12*L*H*Q*T.")
    return 0


_RECOMPUTE = {"none": "none (every activation kept for backward)",
              "selective": "selective (the attention core softmax(QK^T)V recomputed in backward)",
              "full": "full (each block's input kept, the block recomputed in backward)"}


def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from gptscale import config
    from gptscale.model.counting import count_parameters, parameters_per_tp_rank
    from gptscale.parallel.topology import RankLayout
    from gptscale.scaling.report import human

    cfg = config.load(args.config, args.set)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    m, tp = cfg.model, cfg.parallel.tp
    counts = count_parameters(m)
    print(f"\nparameters: {counts.total:,} ({human(counts.total)})")
    for part in ("embedding", "positional", "blocks", "final_norm", "head"):
        print(f"  {part:<11}{getattr(counts, part):>20,}")
    print(f"per TP rank at tp={tp}: {parameters_per_tp_rank(m, tp):,} (vocabulary padded to "
          f"{m.padded_vocab_size(tp):,})")
    print(f"run mode: {cfg.parallel.resolved_mode}")
    split = f"on (norms, dropout and the residual stream on 1/{tp} of the sequence)"
    print(f"sequence parallelism: {split if cfg.parallel.sequence_parallel else 'off'}")
    print(f"activation recompute: {_RECOMPUTE[m.activation_checkpointing]}")
    if args.world_size:
        layout = RankLayout.for_world(args.world_size, cfg.parallel)
        print(f"\nrank layout for {args.world_size} ranks: {dataclasses.asdict(layout)} (TP fastest)")
        for axis in ("tp", "dp", "pp"):
            print(f"  {axis} groups: {layout.groups(axis)}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from gptscale.testing.selftest import run_selftest

    return 0 if run_selftest(args.ranks, timeout=args.timeout) else 1


def add_parsers(sub) -> None:
    p = sub.add_parser("presets", help="list the built-in model shapes")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="resolve a config and show sizes and rank layout",
                       description="Resolve a run config (YAML + overrides) and print it with its exact "
                                   "parameter count, the parameters each TP rank holds, the run mode and the "
                                   "rank layout.")
    add_config_options(p)
    p.add_argument("--world-size", type=positive_int, help="also print the TP/DP/PP groups for this many ranks")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("selftest", help="TP=N vs dense on N local CPU ranks",
                       description="Spawn N CPU ranks (gloo), build the tiny GPT-2 and Llama presets with "
                                   "TP=N from the same weights as the dense model, and compare logits, loss, "
                                   "every gradient and generation. Exits 1 if any rank differs by more than 1e-5.")
    p.add_argument("--ranks", type=positive_int, default=2, help="number of local ranks = TP degree (default 2)")
    p.add_argument("--timeout", type=non_negative_float, default=300.0, help="seconds before the ranks are killed")
    p.set_defaults(func=cmd_selftest)
