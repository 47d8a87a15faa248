"""The throughput harness: gptscale against its peers, side by side, in one run.

Each comparison runs in one process tree (spawned gloo CPU ranks, or CUDA devices where there
are some), builds both contenders in the same rank processes, and alternates timed windows
A, B, B, A, A, B, ... so that drift (thermal, other load) falls on both alike. It prints the
median tokens/s of each, the ratio, and writes everything (settings included) as JSON.

    .venv/bin/python bench/run.py                      # all four, 5 repetitions each
    .venv/bin/python bench/run.py --only ddp --reps 7  # one comparison

Comparisons (targets are issue 18's):
  transformers  gptscale's GPT-2 and Llama against transformers' GPT2LMHeadModel and
                LlamaForCausalLM of the same shape, the same assembled ZeRO-3 config (its leaf
                module translated to the peer's decoder block), the same
                ranks and tokens (raw engine loops on both sides). Target >= 1.2x.
  ddp           gptscale's model under its ZeRO-3 engine against the same model under plain
                PyTorch DDP with torch's AdamW and the same clipping: ZeRO-3's overhead. <= 1.3x.
  gemm          one rank (all cores) training the gpt2-124m preset through gptscale's step,
                its model FLOP/s against the fp32 GEMM peak measured in the same process
                between the windows. >= 50%.
  trainer       `gptscale train`'s loop (Trainer.run, wall time between its per-step metrics
                records) against the bare engine loop of the same Trainer's engine. >= 90%.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout

from gptscale.testing.distributed import run_ranks  # noqa: E402

# The shape the multi-rank comparisons share: small enough for 2 CPU ranks, every part of a GPT.
SHAPE = {"n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 8192, "seq_len": 256, "micro_batch": 4}
WARMUP_STEPS = 2


def _overrides(family: str, shape: dict, out_dir: str, extra: list[str] = ()) -> list[str]:
    s = shape
    model = ([f"model.preset={s['preset']}"] if "preset" in s else
             [f"model.family={family}", f"model.n_layer={s['n_layer']}", f"model.n_embd={s['n_embd']}",
              f"model.n_head={s['n_head']}", f"model.vocab_size={s['vocab_size']}",
              f"model.block_size={s['seq_len']}"])
    if family == "llama" and "preset" not in s:
        model += [f"model.n_kv_head={s['n_head'] // 3}", f"model.ffn_hidden={4 * s['n_embd']}"]
    return [*model, f"data.seq_len={s['seq_len']}", "data.synthetic=true", f"train.micro_batch={s['micro_batch']}",
            "train.grad_accum=1", "train.eval_every=0", "train.save_every=0", "train.sample_tokens=0",
            "train.progress=false", "train.tensorboard=false", "train.lr=1e-4", "train.warmup_steps=0",
            f"train.out_dir={out_dir}", *extra]


def _trainer(overrides: list[str]):
    from gptscale import config
    from gptscale.train.loop import Trainer

    os.environ["GPTSCALE_QUIET_SAVE"] = "1"
    return Trainer(config.load(None, overrides), resume="none", overwrite_run=True)


def _alternate(contenders: dict[str, Callable[[], None]], reps: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each contender, one entry per repetition; windows alternate ABBA."""
    import torch.distributed as dist

    names = list(contenders)
    for name in names:
        for _ in range(WARMUP_STEPS):
            contenders[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                contenders[name]()
            dist.barrier()
            seconds[name].append((time.perf_counter() - start) / steps)
    return seconds


def _engine_step(engine, batches, hf: bool = False) -> Callable[[], None]:
    def step():
        x, y = (t.to(engine.device) for t in next(batches))
        loss = engine(input_ids=x, labels=x).loss if hf else engine(x, labels=y)
        engine.backward(loss)
        engine.step()
    return step


def hf_model(m, **overrides):
    """transformers' model of gptscale model config `m`: the config `gptscale convert to-hf`
    writes (`convert.hf.hf_config`, the same maths), with torch's SDPA attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptscale.convert.hf import hf_config

    config = AutoConfig.for_model(**{**hf_config(m, None, None), **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _synthetic(cfg, topo):
    from gptscale.train.batches import SyntheticBatches

    return iter(SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, cfg.train.micro_batch, 1, topo.coords.dp,
                                 topo.layout.dp, 0))


# -- the comparisons, each run on every rank ----------------------------------------------------

def vs_transformers(overrides: list[str], reps: int, steps: int) -> dict:
    import torch

    from gptscale.ds_import import import_deepspeed

    import transformers  # noqa: F401 - before zero.Init patches tensor construction
    trainer = _trainer(overrides)
    cfg, topo, ds = trainer.cfg, trainer.topo, import_deepspeed()
    torch.manual_seed(0)
    with ds.zero.Init(config_dict_or_path=trainer.ds_config, mpu=topo,
                      data_parallel_group=topo.get_data_parallel_group()):
        theirs = hf_model(cfg.model)
    peer_config = _with_peer_leaf_blocks(trainer.ds_config, theirs)
    engine, *_ = ds.initialize(model=theirs, model_parameters=theirs.parameters(), config=peer_config, mpu=topo)
    ours = trainer.runtime.engine
    seconds = _alternate({"gptscale": _engine_step(ours, _synthetic(cfg, topo)),
                          "transformers": _engine_step(engine, _synthetic(cfg, topo), hf=True)}, reps, steps)
    return {"seconds_per_step": seconds, "ds_config": trainer.ds_config, "peer_ds_config": peer_config}


def _with_peer_leaf_blocks(ds_config: dict, model) -> dict:
    """The same DeepSpeed config for the peer, with its own decoder block as the ZeRO-3 leaf
    module where the config names gptscale's `Block`: otherwise that name matches nothing in
    the transformers model and it alone keeps per-layer gather hooks (worth ~3% of the ratio)."""
    zero = ds_config.get("zero_optimization", {})
    if "leaf_module" not in zero:
        return ds_config
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h  # Llama / GPT-2
    block = type(blocks[0])
    leaf = {"classes": [f"{block.__module__}.{block.__qualname__}"]}
    return {**ds_config, "zero_optimization": {**zero, "leaf_module": leaf}}


def vs_ddp(overrides: list[str], reps: int, steps: int) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from gptscale.model.gpt import GPT
    from gptscale.parallel.topology import TPGroup

    trainer = _trainer(overrides)
    cfg, topo, t = trainer.cfg, trainer.topo, trainer.cfg.train
    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(cfg.model, TPGroup.single()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  weight_decay=t.weight_decay)
    batches = _synthetic(cfg, topo)

    def ddp_step():
        x, y = next(batches)
        model(x, labels=y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _alternate({"gptscale_zero3": _engine_step(trainer.runtime.engine, _synthetic(cfg, topo)),
                          "torch_ddp": ddp_step}, reps, steps)
    return {"seconds_per_step": seconds, "ds_config": trainer.ds_config}


def vs_gemm_peak(overrides: list[str], reps: int, steps: int) -> dict:
    """Alternates a window of training steps with a GEMM peak measurement, all threads."""
    import torch

    from gptscale.model.counting import flops_per_token
    from gptscale.scaling.hardware import measure_cpu_peak_tflops

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    trainer = _trainer(overrides)
    cfg, runtime = trainer.cfg, trainer.runtime
    batches = iter(trainer.task.train_batches(0, 1))

    class Counter:  # the non-finite policy the step reports to (never triggers here)
        def nonfinite(self, step, what):
            raise AssertionError(f"non-finite {what} at step {step}")

    def train_step():
        runtime.train_step(batches, 0, Counter())

    def peak() -> float:  # the best of the square GEMMs the model's own sizes bracket
        return max(measure_cpu_peak_tflops(seconds=1.0, n=n) for n in (1024, 2048))

    for _ in range(WARMUP_STEPS):
        train_step()
    seconds, peaks = [], [peak()]
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(steps):
            train_step()
        seconds.append((time.perf_counter() - start) / steps)
        peaks.append(peak())
    return {"seconds_per_step": {"gptscale_step": seconds}, "peak_tflops": peaks, "threads": threads,
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)}


def vs_bare_loop(overrides: list[str], reps: int, steps: int) -> dict:
    """Per repetition a fresh Trainer: its engine's bare loop, then Trainer.run (or the other
    order), the latter timed between its own metrics records (everything the loop does per step)."""
    import torch.distributed as dist

    base_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.out_dir="))
    seconds: dict[str, list[float]] = {"gptscale_train": [], "bare_engine_loop": []}
    total = WARMUP_STEPS + steps
    for rep in range(reps):
        out_dir = f"{base_dir}/rep{rep}"
        trainer = _trainer([*overrides, f"train.out_dir={out_dir}", f"train.steps={total}"])
        bare = _engine_step(trainer.runtime.engine, _synthetic(trainer.cfg, trainer.topo))
        for which in (("bare", "train") if rep % 2 == 0 else ("train", "bare")):
            if which == "bare":
                for _ in range(WARMUP_STEPS):
                    bare()
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    bare()
                dist.barrier()
                seconds["bare_engine_loop"].append((time.perf_counter() - start) / steps)
            else:
                trainer.run()
                if dist.get_rank() == 0:
                    records = [json.loads(line) for line in open(f"{out_dir}/metrics.jsonl")]
                    wall = {r["step"]: r["wall_s"] for r in records if "wall_s" in r}
                    seconds["gptscale_train"].append((wall[total] - wall[WARMUP_STEPS]) / steps)
    return {"seconds_per_step": seconds}


@dataclass(frozen=True)
class Comparison:
    body: Callable[..., dict]  # runs on every rank; rank 0's result is kept
    label: str  # what the ratio is
    ratio: Callable[[dict, dict], float]  # (median tokens/s of each contender, the body's result) -> ratio
    target: float
    at_least: bool  # the ratio must reach the target (else stay at or under it)
    shape: dict = field(default_factory=lambda: SHAPE)
    one_rank: bool = False


def _first_over_second(tokens: dict, result: dict) -> float:
    a, b = tokens.values()
    return a / b


def _step_time_over_second(tokens: dict, result: dict) -> float:
    a, b = tokens.values()
    return b / a


def _share_of_peak(tokens: dict, result: dict) -> float:
    (rate,) = tokens.values()
    return result["flops_per_token"] * rate / 1e12 / statistics.median(result["peak_tflops"])


COMPARISONS = {
    "transformers": Comparison(vs_transformers, "gptscale / transformers", _first_over_second, 1.2, True),
    "ddp": Comparison(vs_ddp, "ZeRO-3 step time / DDP step time", _step_time_over_second, 1.3, False),
    "gemm": Comparison(vs_gemm_peak, "model FLOP/s / measured GEMM peak", _share_of_peak, 0.5, True,
                       shape={"preset": "gpt2-124m", "seq_len": 256, "micro_batch": 4}, one_rank=True),
    "trainer": Comparison(vs_bare_loop, "gptscale train / bare engine loop", _first_over_second, 0.9, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="transformers,ddp,gemm,trainer",
                        help="comma-separated comparisons to run (default: all four)")
    parser.add_argument("--reps", type=int, default=5, help="timed windows per contender (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per window")
    parser.add_argument("--ranks", type=int, default=2, help="ranks for transformers, ddp and trainer")
    parser.add_argument("--json", default="bench/run.json", help="where the results go")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides for gptscale's side, e.g. train.ds_config=my.json")
    parser.add_argument("--families", default="gpt2,llama", help="families the transformers comparison runs")
    args = parser.parse_args()
    env = {"DS_ACCELERATOR": "cpu"}
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps, "steps_per_window": args.steps,
              "cpus": len(os.sched_getaffinity(0)), "dtype": "fp32", "comparisons": {}}
    for name in args.only.split(","):
        c = COMPARISONS[name]
        ranks = 1 if c.one_rank else args.ranks
        sense = ">=" if c.at_least else "<="
        for family in (args.families.split(",") if name == "transformers" else ("gpt2",)):
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="gptscale-bench-") as out_dir:
                overrides = _overrides(family, c.shape, out_dir, args.set)
                result = run_ranks(c.body, ranks, overrides, args.reps, args.steps, timeout=3600, env=env)[0]
            tokens_per_step = c.shape["seq_len"] * c.shape["micro_batch"] * ranks
            tokens = {k: tokens_per_step / statistics.median(v) for k, v in result["seconds_per_step"].items()}
            ratio = c.ratio(tokens, result)
            ok = ratio >= c.target if c.at_least else ratio <= c.target
            key = f"{name}/{family}" if name == "transformers" else name
            report["comparisons"][key] = {"label": c.label, "tokens_per_s": tokens, "ratio": ratio,
                                          "target": f"{sense} {c.target}", "met": ok, "ranks": ranks,
                                          "family": family, "shape": c.shape, "tokens_per_step": tokens_per_step,
                                          "wall_s": round(time.perf_counter() - started, 1), **result}
            rates = "  ".join(f"{k} {v:,.0f} tok/s" for k, v in tokens.items())
            print(f"{key:<20} {rates}  ->  {c.label} = {ratio:.3f} (target {sense} {c.target}: "
                  f"{'met' if ok else 'NOT met'})", flush=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"shape {SHAPE} (gemm: gpt2-124m, seq 256, micro-batch 4, 1 rank), fp32, {args.reps} alternating "
          f"windows of {args.steps} steps per contender; JSON: {args.json}")


if __name__ == "__main__":
    main()
