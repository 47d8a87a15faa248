"""Which folders count as checkpoints and in what order (no ranks needed)."""
import json

import pytest

from gptscale.checkpoint.layout import CheckpointMeta, Layout, tag_for
from gptscale.checkpoint.resume import complete_checkpoints, find_resume
from gptscale.errors import CheckpointError


def _fake(folder, step, commit, name=None):
    path = folder / (name or tag_for(step))
    path.mkdir(parents=True)
    meta = CheckpointMeta(step=step, layout=Layout("zero3", 1, 1, 1), model={}, run_id="r", commit=commit)
    (path / "COMPLETE.json").write_text(meta.to_json())
    return path


def test_order_is_by_commit_then_step_past_step_10_to_the_8(tmp_path):
    folder = tmp_path / "checkpoints"
    _fake(folder, 99_999_999, 1)
    _fake(folder, 100_000_000, 2)  # 'step100000000' sorts before 'step99999999' by name
    assert [p.name for p in complete_checkpoints(folder)] == ["step99999999", "step100000000"]
    _fake(folder, 5, 3)  # a later commit of an earlier step: a resumed branch
    assert find_resume(tmp_path, "auto").name == "step00000005"


def test_which_folders_are_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    _fake(folder, 8, 1, name="step00000008.old")  # not a checkpoint's name
    _fake(folder, 9, 2, name=".step00000009.partial-abc.replaced")  # superseded, on its way out
    (folder / ".step00000010.partial-abc").mkdir()  # a save cut short: no COMPLETE.json
    assert complete_checkpoints(folder) == [] and find_resume(tmp_path, "auto") is None
    # A staged save with COMPLETE.json whose rename a crash prevented is complete, and newest.
    _fake(folder, 5, 3)
    staged = _fake(folder, 11, 4, name=".step00000011.partial-abc")
    assert find_resume(tmp_path, "auto") == staged


@pytest.mark.parametrize("text, needle", [
    ("{", "not valid JSON"),
    ("[]", "integer 'step'"),
    (json.dumps({"step": 1, "model": {}, "layout": {"mode": "zero3", "tp": 1}}), "layout"),
    (json.dumps({"step": 1, "model": {}, "layout": {"mode": "zero3", "tp": 0, "pp": 1, "dp": 1}}), "degree below 1"),
    (json.dumps({"step": 1, "model": {}, "layout": {"mode": "zero3", "tp": 1, "pp": 1, "dp": 1}, "commit": "x"}),
     "wrong type"),
])
def test_a_damaged_complete_json_names_the_file(tmp_path, text, needle):
    ckpt = tmp_path / "checkpoints" / "step00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE.json").write_text(text)
    with pytest.raises(CheckpointError, match=needle) as err:
        CheckpointMeta.read(ckpt)
    assert "COMPLETE.json" in str(err.value)
