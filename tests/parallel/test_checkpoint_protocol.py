"""The save/resume protocol on 2 gloo ranks: which checkpoint a resume takes, what replaces
what, what is durable before COMPLETE.json, and which config changes a resume applies."""
import json
import os
import re

import pytest

from gptscale import config
from gptscale.checkpoint.resume import find_resume
from gptscale.runtime.optim import lr_at
from gptscale.testing.distributed import run_ranks
from tests.parallel.training import ENV, synthetic, train_ranks

pytestmark = pytest.mark.dist


def _steps(tmp_path, name, steps, *extra):
    return synthetic(tmp_path, name, f"train.steps={steps}", "train.save_every=1", "train.keep_checkpoints=3", *extra)


def _saved(run_dir):
    return {p.name: json.loads((p / "COMPLETE.json").read_text()) for p in (run_dir / "checkpoints").iterdir()
            if p.is_dir() and (p / "COMPLETE.json").is_file()}


def test_a_resume_from_an_older_checkpoint_continues_that_branch(tmp_path):
    run_dir = tmp_path / "branch"
    run_ranks(train_ranks, 2, _steps(tmp_path, "branch", 4), "none", timeout=300, env=ENV)
    assert sorted(_saved(run_dir)) == ["step00000002", "step00000003", "step00000004"]
    (run_dir / "checkpoints" / "step00000003" / "from_the_first_branch").write_text("x")
    # Back to step 2, on for one step: a new step 3 replaces the old one whole, and is the newest.
    older = str(run_dir / "checkpoints" / "step00000002")
    run_ranks(train_ranks, 2, _steps(tmp_path, "branch", 3), older, timeout=300, env=ENV)
    saved = _saved(run_dir)
    assert saved["step00000003"]["commit"] == max(meta["commit"] for meta in saved.values())
    assert not (run_dir / "checkpoints" / "step00000003" / "from_the_first_branch").exists()
    assert find_resume(run_dir, "auto").name == "step00000003"  # not the first branch's step 4
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    assert len({meta["run_id"] for meta in saved.values()}) == 1


def _record_syncs(overrides):
    """Rank body: train while recording, in order, every os.fsync (by path) and file-system flush."""
    from gptscale.checkpoint import resume

    synced = []
    real_fsync, real_flush = os.fsync, resume.sync_filesystem

    def fsync(fd):
        synced.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def flush(path):
        synced.append(("syncfs", str(path)))
        return real_flush(path)

    os.fsync, resume.sync_filesystem = fsync, flush
    try:
        train_ranks(overrides, "none")
    finally:
        os.fsync, resume.sync_filesystem = real_fsync, real_flush
    return synced


def test_everything_is_durable_before_complete_json(tmp_path):
    """DeepSpeed syncs none of its files: every rank flushes the file system it wrote its part
    to, and rank 0 syncs every folder of the checkpoint, before COMPLETE.json exists."""
    results = run_ranks(_record_syncs, 2, _steps(tmp_path, "durable", 1), timeout=300, env=ENV)
    ckpt = tmp_path / "durable" / "checkpoints" / "step00000001"
    for synced in results:
        assert any(kind == "syncfs" and ".step00000001.partial-" in path for kind, path in synced), synced
    rank0 = results[0]
    complete = next(i for i, (kind, path) in enumerate(rank0) if re.search(r"/COMPLETE\.json\.tmp-\d+$", path))
    before = rank0[:complete]
    staged_folders = {re.sub(r".*\.partial-[^/]+", "", p) or "/" for kind, p in before
                      if kind == "fsync" and ".partial-" in p and not re.search(r"\.[a-z]+(\.tmp-\d+)?$", p)}
    folders = {"/" + str(p.relative_to(ckpt)) if p != ckpt else "/" for p in [ckpt, *ckpt.rglob("*")] if p.is_dir()}
    assert folders <= staged_folders, folders - staged_folders
    assert any(kind == "syncfs" for kind, _ in before)


def test_a_resume_applies_changed_settings_and_says_so(tmp_path, capfd):
    first = _steps(tmp_path, "changed", 3, "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=1")
    run_ranks(train_ranks, 2, first, "none", timeout=300, env=ENV)
    second = [*first, "train.steps=5", "train.lr=2e-3", "model.dropout=0.1"]  # dropout is no change of shape
    run_ranks(train_ranks, 2, second, timeout=300, env=ENV)
    assert "resuming with changed settings: model.dropout: 0.0 -> 0.1; train.steps: 3 -> 5; train.lr: 0.001 -> 0.002" \
        in capfd.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "changed" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r and r["step"] > 3}
    t = config.load(None, second).train
    # After step s the scheduler holds the rate of step s (0-based), this run's.
    assert logged == pytest.approx({4: lr_at(4, t), 5: lr_at(5, t)}, rel=1e-12)
