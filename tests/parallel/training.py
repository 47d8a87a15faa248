"""Shared pieces of the trainer tests: rank bodies, run configs and the dense reference."""
import os
import signal
import threading

import torch

from gptscale import config

ENV = {"DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1"}
SMALL_MODEL = ["model.preset=tiny", "model.vocab_size=512", "model.n_layer=2", "model.n_embd=64",
               "model.block_size=64"]
SMALL_GPT2_4_BLOCKS = [*SMALL_MODEL, "model.n_layer=4"]  # enough blocks for 4 pipeline stages
# Untied head, RoPE, RMSNorm, SwiGLU, grouped-query attention (4 heads over 2 KV heads).
SMALL_LLAMA = ["model.preset=tiny-llama", "model.vocab_size=512", "model.n_layer=4", "model.n_embd=64",
               "model.n_head=4", "model.n_kv_head=2", "model.block_size=64"]


def train_ranks(overrides, resume="auto", sigterm_after=None):
    """Rank body: train with `overrides`; optionally SIGTERM rank 1 after a delay."""
    import torch.distributed as dist

    from gptscale.train.loop import train

    if sigterm_after is not None and dist.get_rank() == 1:
        threading.Timer(sigterm_after, os.kill, (os.getpid(), signal.SIGTERM)).start()
    result = train(config.load(None, overrides), resume=resume)
    return {"losses": result.losses, "val": result.val_losses, "steps": result.steps_done,
            "signal": result.stopped_by_signal, "sample": result.sample}


def train_layouts(runs, resume="none"):
    """Rank body: several trainings one after another in the same ranks (each its own layout
    and engine), to pay the ranks' start-up once. Returns each run's result."""
    return [train_ranks(overrides, resume) for overrides in runs]


def train_in_turn(runs):
    """Rank body: several trainings, each (overrides, resume), one after another in the same ranks."""
    return [train_ranks(overrides, resume) for overrides, resume in runs]


def synthetic(tmp_path, name, *extra, model=SMALL_MODEL):
    """5 steps of 2 micro-steps x 4 rows (micro_batch=2 on each of 2 DP ranks) of synthetic data."""
    return [*model, "data.synthetic=true", "data.seq_len=32", f"train.out_dir={tmp_path / name}",
            "train.steps=5", "train.micro_batch=2", "train.grad_accum=2", "train.lr=1e-3", "train.min_lr=1e-4",
            "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
            "train.tensorboard=false", "train.sample_tokens=0", *extra]


def real(tmp_path, shards, name, steps, *extra):
    return [*SMALL_MODEL, f"data.path={shards}", "data.seq_len=32", "data.num_workers=1",
            f"train.out_dir={tmp_path / name}", f"train.steps={steps}", "train.micro_batch=4", "train.lr=3e-3",
            "train.min_lr=3e-4", "train.warmup_steps=3", "train.eval_every=0", "train.eval_batches=2",
            "train.progress=false", "train.sample_tokens=8", *extra]


def check_exact_resume(tmp_path, shards, world, *extra, timeout=300, sigterm=True):
    """6 steps in one go == 3 steps, end, resume for 3 more (bitwise), and (sigterm) a run
    SIGTERMed at a random point saves on every rank, exits 0 and resumes to the same losses.
    Dropout is on (the RNG must resume exactly) and the warmup is 2 steps, so the 3-step run's
    schedule leaves another learning rate in its checkpoint than the 6-step run uses at step 4
    (the resumed run must follow its own schedule). Returns the full run's result (rank 0)."""
    import numpy as np

    from gptscale.testing.distributed import run_ranks

    def run(name, steps, *args):
        overrides = real(tmp_path, shards, name, steps, "model.dropout=0.1", "train.warmup_steps=2", *extra)
        return run_ranks(train_ranks, world, overrides, *args, timeout=timeout, env=ENV)

    full = run("full", 6, "none")[0]
    run("split", 3)  # N steps, "kill" (the run ends) ...
    second = run("split", 6)[0]["losses"]  # ... resume for N more, in fresh processes
    assert sorted(second) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second[step] == full["losses"][step], (step, second, full)  # bitwise: fp32 CPU is deterministic
    if not sigterm:
        return full
    delay = float(np.random.default_rng().uniform(4.0, 9.0))
    stopped = run("sig", 6, "none", delay)
    if stopped[0]["steps"] < 6:
        assert all(r["signal"] for r in stopped), stopped
        done = stopped[0]["steps"]
        rest = run("sig", 6)[0]["losses"]
        assert sorted(rest) == list(range(done + 1, 7))
        both = {**stopped[0]["losses"], **rest}
    else:
        both = stopped[0]["losses"]  # the signal came after the last step
    assert both == full["losses"]
    return full


def save_init_weights(path, model_overrides, seed=42):
    """Canonical starting weights, so differently split runs start from the same model."""
    from gptscale.checkpoint.weights import canonical_state_dict, save_canonical
    from gptscale.model.gpt import GPT

    cfg = config.load(None, model_overrides)
    torch.manual_seed(seed)
    save_canonical(canonical_state_dict(GPT(cfg.model)), path)
    return path


def plain_adamw_losses(overrides, init_path, steps, rows_per_micro_step=4):
    return dense_reference(overrides, init_path, steps, rows_per_micro_step)[0]


def dense_reference(overrides, init_path, steps, rows_per_micro_step=4):
    """The same run without DeepSpeed: one process, torch AdamW, the whole global batch
    (grad_accum micro-steps of `rows_per_micro_step` = dp x micro_batch rows, as the ranks split it).
    Returns ({step: loss}, the final canonical weights)."""
    from safetensors.torch import load_file

    from gptscale.checkpoint.weights import canonical_state_dict
    from gptscale.convert.tp import split_tp
    from gptscale.model.gpt import GPT
    from gptscale.parallel.layers import split_table
    from gptscale.runtime.optim import lr_at, param_groups
    from gptscale.train.batches import SyntheticBatches

    cfg = config.load(None, overrides)
    t = cfg.train
    model = GPT(cfg.model)
    model.load_state_dict(split_tp(load_file(str(init_path)), split_table(model), 1, model.padded_vocab)[0])
    groups = param_groups(model, dict(model.named_parameters()), t.weight_decay, trains=lambda name: True)
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    data = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, rows_per_micro_step, t.grad_accum, 0, 1,
                            cfg.data.seed)
    losses = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        batch = data.global_batch(step)
        total = 0.0
        for micro in range(t.grad_accum):
            rows = batch[micro * rows_per_micro_step:(micro + 1) * rows_per_micro_step]
            loss = model(rows[:, :-1], labels=rows[:, 1:])
            (loss / t.grad_accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()
        losses[step + 1] = total / t.grad_accum
    return losses, canonical_state_dict(model)


def loss_with_weights(overrides, canonical) -> float:
    """The dense model's loss on a fixed held-out synthetic batch with `canonical` weights."""
    from gptscale.convert.tp import split_tp
    from gptscale.model.gpt import GPT
    from gptscale.parallel.layers import split_table
    from gptscale.train.batches import SyntheticBatches

    cfg = config.load(None, overrides)
    model = GPT(cfg.model)
    model.load_state_dict(split_tp(canonical, split_table(model), 1, model.padded_vocab)[0])
    rows = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, 8, 1, 0, 1, seed=99).global_batch(0)
    with torch.no_grad():
        return model(rows[:, :-1], labels=rows[:, 1:]).item()


def assert_weights_match(weights, dense, overrides, loss_tol):
    """Consolidated weights vs the dense run's. Adam turns gradient differences of 1e-7 into
    update differences of up to lr where a gradient is near zero (a rare token's embedding
    row), so a few elements may differ by ~lr; a misplaced tensor differs everywhere by the
    init scale (2e-2). What the weights compute must agree tightly."""
    assert weights.keys() == dense.keys()
    close = sum(((weights[k] - dense[k]).abs() < 5e-4).sum().item() for k in weights)
    total = sum(v.numel() for v in weights.values())
    assert close / total > 0.999, (close, total)
    assert abs(loss_with_weights(overrides, weights) - loss_with_weights(overrides, dense)) < loss_tol


def finetune_in_turn(runs):
    """Rank body: fine-tuning runs (overrides, resume), one after another in the same ranks;
    each also says whether this rank's frozen parameters (its shards of them) came out of
    training bitwise as they went in."""
    from gptscale.train.loop import Trainer
    from gptscale.train.tasks import FineTuning

    def local(param):  # this rank's ZeRO-3 partition, or the whole tensor
        return (param.ds_tensor if hasattr(param, "ds_tensor") else param).detach().clone()

    out = []
    for overrides, resume in runs:
        cfg = config.load(None, overrides)
        trainer = Trainer(cfg, resume, FineTuning(cfg))
        params = trainer.runtime.canonical_parameters()
        frozen = {name: local(p) for name, p in params.items() if not p.requires_grad}
        result = trainer.run()
        out.append({"losses": result.losses, "val": result.val_losses, "steps": result.steps_done,
                    "exact_match": result.exact_match, "exact_match_before": result.exact_match_before,
                    "frozen": len(frozen), "frozen_unchanged": all(torch.equal(frozen[n], local(params[n]))
                                                                   for n in frozen)})
    return out
