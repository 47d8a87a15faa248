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


def _record_fsyncs(overrides):
    """Rank body: train while recording what os.fsync was called on, in order."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    os.fsync = fsync
    try:
        train_ranks(overrides, "none")
    finally:
        os.fsync = real
    return synced


def test_every_file_is_durable_before_complete_json(tmp_path):
    results = run_ranks(_record_fsyncs, 2, _steps(tmp_path, "durable", 1), timeout=300, env=ENV)
    ckpt = tmp_path / "durable" / "checkpoints" / "step00000001"
    # Rank 0 writes COMPLETE.json; what any rank synced before it, as names inside the staging
    # folder (atomic writes sync 'NAME.tmp-PID' before renaming it to NAME).
    synced = results[1] + results[0]  # rank 1 finished its part before rank 0 committed (a barrier)
    complete = next(i for i, p in enumerate(synced) if re.search(r"/COMPLETE\.json\.tmp-\d+$", p))
    before = {re.sub(r"\.tmp-\d+$", "", p.split(".partial-", 1)[1].split("/", 1)[1])
              for p in synced[:complete] if re.search(r"\.partial-[^/]+/.", p)}
    written = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE.json"}
    assert written and written <= before, written - before


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
