"""The ZeRO-3 trainer on 2 gloo CPU ranks: parity with dense references, exact resume,
signals, crash-safe checkpoints."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptscale import config
from gptscale.engine.checkpoint import COMPLETE, find_resume
from gptscale.testing.distributed import RankFailure, run_ranks

pytestmark = pytest.mark.dist
ENV = {"DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1"}
SMALL_MODEL = ["model.preset=tiny", "model.vocab_size=512", "model.n_layer=2", "model.n_embd=64",
               "model.block_size=64"]


def _train(overrides, resume="auto", sigterm_after=None):
    """Rank body: train with `overrides`; optionally SIGTERM this rank after a delay."""
    import torch.distributed as dist

    from gptscale.engine.trainer import train

    if sigterm_after is not None and dist.get_rank() == 1:
        threading.Timer(sigterm_after, os.kill, (os.getpid(), signal.SIGTERM)).start()
    result = train(config.load(None, overrides), resume=resume)
    return {"losses": result.losses, "val": result.val_losses, "steps": result.steps_done,
            "signal": result.stopped_by_signal}


def synthetic(tmp_path, name, *extra):
    return [*SMALL_MODEL, "data.synthetic=true", "data.seq_len=32", f"train.out_dir={tmp_path / name}",
            "train.steps=5", "train.micro_batch=2", "train.grad_accum=2", "train.lr=1e-3", "train.min_lr=1e-4",
            "train.warmup_steps=2", "train.eval_every=0", "train.eval_batches=1", "train.progress=false",
            "train.tensorboard=false", "train.sample_tokens=0", *extra]


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """Canonical starting weights, so differently split runs start from the same model."""
    from gptscale.engine.weights import canonical_state_dict, save_canonical
    from gptscale.model.gpt import GPT

    cfg = config.load(None, [*SMALL_MODEL])
    torch.manual_seed(42)
    path = tmp_path_factory.mktemp("init") / "init.safetensors"
    save_canonical(canonical_state_dict(GPT(cfg.model)), path)
    return path


def plain_adamw_losses(overrides, init_path, steps):
    """The same run without DeepSpeed: one process, torch AdamW, the whole global batch."""
    from safetensors.torch import load_file

    from gptscale.convert.tp import split_tp
    from gptscale.engine.data import SyntheticBatches
    from gptscale.engine.schedule import lr_at
    from gptscale.engine.trainer import _param_groups
    from gptscale.model.gpt import GPT
    from gptscale.parallel.layers import split_table

    cfg = config.load(None, overrides)
    t = cfg.train
    model = GPT(cfg.model)
    model.load_state_dict(split_tp(load_file(str(init_path)), split_table(model), 1, model.padded_vocab)[0])
    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    # The global batch of the 2-rank run: grad_accum x (dp=2 x micro_batch) rows per step.
    data = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, t.micro_batch, t.grad_accum, 0, 2, cfg.data.seed)
    losses = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        batch = data.global_batch(step)
        total = 0.0
        for micro in range(t.grad_accum):  # dp=2 x micro_batch=2 rows per micro-step, as the ranks split it
            rows = batch[micro * 4:(micro + 1) * 4]
            loss = model(rows[:, :-1], labels=rows[:, 1:])
            (loss / t.grad_accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()
        losses[step + 1] = total / t.grad_accum
    return losses


def test_zero3_equals_plain_adamw_and_tp2_equals_tp1(tmp_path, init_weights):
    zero3 = synthetic(tmp_path, "dp2", f"train.init_from={init_weights}")
    dp2 = run_ranks(_train, 2, zero3, "none", timeout=300, env=ENV)
    # tp=2 leaves dp=1: twice the micro-batch keeps the global batch (and its rows) the same.
    tp2 = run_ranks(_train, 2, synthetic(tmp_path, "tp2", f"train.init_from={init_weights}", "parallel.tp=2",
                                         "train.micro_batch=4"), "none", timeout=300, env=ENV)
    reference = plain_adamw_losses(zero3, init_weights, 5)
    for rank in range(2):
        assert dp2[rank]["losses"] == dp2[0]["losses"] and tp2[rank]["losses"] == tp2[0]["losses"]
    for step in range(1, 6):
        assert abs(dp2[0]["losses"][step] - reference[step]) < 1e-4, (step, dp2[0]["losses"], reference)
        assert abs(tp2[0]["losses"][step] - dp2[0]["losses"][step]) < 1e-4, (step, tp2[0]["losses"])
    assert reference[5] < reference[1]  # it learns: the comparison is not between constants
    # The checkpoints of both layouts consolidate to the same weights.
    from gptscale.engine.consolidate import consolidate

    _, dp_weights = consolidate(tmp_path / "dp2" / "checkpoints" / "step00000005")
    _, tp_weights = consolidate(tmp_path / "tp2" / "checkpoints" / "step00000005")
    assert dp_weights.keys() == tp_weights.keys()
    assert max((dp_weights[k] - tp_weights[k]).abs().max().item() for k in dp_weights) < 1e-5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gptscale.data.prepare import prepare
    from gptscale.data.sources import embedded_documents
    from gptscale.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    train_tokenizer([text for _, text in embedded_documents("pydoc")], 512, root / "tok")
    prepare(["builtin:pydoc"], str(root / "tok"), root / "shards", shard_bytes=48 << 10, val_fraction=0.05,
            workers=1, progress=False)
    return root / "shards"


def real(tmp_path, shards, name, steps, *extra):
    return [*SMALL_MODEL, f"data.path={shards}", "data.seq_len=32", "data.num_workers=1",
            f"train.out_dir={tmp_path / name}", f"train.steps={steps}", "train.micro_batch=4", "train.lr=3e-3",
            "train.min_lr=3e-4", "train.warmup_steps=3", "train.eval_every=0", "train.eval_batches=2",
            "train.progress=false", "train.sample_tokens=8", *extra]


def test_loss_falls_on_real_text_and_metrics_are_written(tmp_path, shards):
    result = run_ranks(_train, 2, real(tmp_path, shards, "falls", 30, "train.eval_every=15"), timeout=300, env=ENV)[0]
    losses = result["losses"]
    assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5, losses
    # A fresh model scores ln(512) = 6.24 on held-out text; the trained one is well below.
    assert max(result["val"][15], result["val"][30]) < 6.24 - 0.5, result["val"]
    records = [json.loads(line) for line in (tmp_path / "falls" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if "loss" in r]
    assert len(train_rows) == 30 and {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gb"} <= set(train_rows[0])
    assert any("val_loss" in r for r in records)
    assert list((tmp_path / "falls" / "tensorboard").glob("events.out.tfevents.*"))


def test_exact_resume_after_kill_and_after_sigterm(tmp_path, shards):
    full = run_ranks(_train, 2, real(tmp_path, shards, "full", 6), "none", timeout=300, env=ENV)[0]["losses"]
    # N steps, "kill" (the run ends), resume for N more.
    run_ranks(_train, 2, real(tmp_path, shards, "split", 3), timeout=300, env=ENV)
    second = run_ranks(_train, 2, real(tmp_path, shards, "split", 6), timeout=300, env=ENV)[0]["losses"]
    assert sorted(second) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second[step] == full[step], (step, second, full)  # bitwise: fp32 CPU is deterministic
    # SIGTERM to one rank at a random point: every rank saves and exits 0; resuming completes the run.
    delay = float(np.random.default_rng().uniform(4.0, 9.0))
    stopped = run_ranks(_train, 2, real(tmp_path, shards, "sig", 6), "none", delay, timeout=300, env=ENV)
    if stopped[0]["steps"] < 6:
        assert all(r["signal"] for r in stopped), stopped
        done = stopped[0]["steps"]
        rest = run_ranks(_train, 2, real(tmp_path, shards, "sig", 6), timeout=300, env=ENV)[0]["losses"]
        assert sorted(rest) == list(range(done + 1, 7))
        both = {**stopped[0]["losses"], **rest}
    else:
        both = stopped[0]["losses"]  # the signal came after the last step
    assert both == full


def test_a_checkpoint_cut_by_a_dying_rank_is_never_resumed(tmp_path, shards):
    overrides = real(tmp_path, shards, "crash", 4, "train.save_every=2")
    with pytest.raises(RankFailure):
        run_ranks(_train, 2, overrides, timeout=300, env={**ENV, "GPTSCALE_FAULT": "die_in_save:4:1"})
    run_dir = tmp_path / "crash"
    assert (run_dir / "checkpoints" / "step00000004").is_dir()
    assert not (run_dir / "checkpoints" / "step00000004" / COMPLETE).exists()
    assert find_resume(run_dir, "auto").name == "step00000002"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = run_ranks(_train, 2, overrides, timeout=300, env=ENV)[0]
    assert sorted(resumed["losses"]) == [3, 4]


def test_activation_checkpointing_under_zero3_changes_memory_not_maths(tmp_path, init_weights):
    plain = run_ranks(_train, 2, synthetic(tmp_path, "plain", f"train.init_from={init_weights}"), "none",
                      timeout=300, env=ENV)[0]["losses"]
    recomputed = run_ranks(_train, 2, synthetic(tmp_path, "ckpt", f"train.init_from={init_weights}",
                                                "model.activation_checkpointing=true"), "none",
                           timeout=300, env=ENV)[0]["losses"]
    assert recomputed == plain  # bitwise: recomputation replays the same fp32 ops
