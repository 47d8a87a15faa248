"""Run modes are interchangeable parts: a fourth mode, registered by this test (fourth_mode.py),
trains through the unchanged loop to the dense reference's losses, and its checkpoint
consolidates through the unchanged reader."""
import json

import pytest

from gptscale import config
from gptscale.errors import ConfigError
from gptscale.testing.distributed import run_ranks
from tests.parallel import fourth_mode
from tests.parallel.training import ENV, assert_weights_match, dense_reference, synthetic, train_ranks

pytestmark = pytest.mark.dist


def _train_in_the_fourth_mode(overrides):
    fourth_mode.register()  # each spawned rank registers it, as gptscale/modes.py would for a real mode
    return train_ranks(overrides, "none")


def test_a_registered_fourth_mode_trains_checkpoints_and_consolidates(tmp_path, init_weights, monkeypatch):
    from gptscale import modes

    monkeypatch.setitem(modes._MODES, fourth_mode.SPEC.name, fourth_mode.SPEC)  # for this test only
    template = tmp_path / "zero2.json"
    template.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}))
    overrides = synthetic(tmp_path, "zero12", f"train.init_from={init_weights}", "parallel.mode=zero12",
                          f"train.ds_config={template}", "train.eval_every=5", "train.lr=1e-2", "train.min_lr=1e-3")
    results = run_ranks(_train_in_the_fourth_mode, 2, overrides, timeout=300, env=ENV)
    reference, dense_final = dense_reference(overrides, init_weights, 5)
    assert results[0]["losses"] == results[1]["losses"]
    worst = max(abs(results[0]["losses"][s] - reference[s]) for s in range(1, 6))
    print(f"max |zero12 - dense| loss over 5 steps: {worst:.2e}")
    assert worst < 1e-4 and reference[5] < reference[1] - 0.02
    assert set(results[0]["val"]) == {0, 5}

    from gptscale.checkpoint.convert import consolidate

    ckpt = tmp_path / "zero12" / "checkpoints" / "step00000005"
    assert json.loads((ckpt / "COMPLETE.json").read_text())["layout"] == {"mode": "zero12", "tp": 1, "pp": 1, "dp": 2}
    _, weights = consolidate(ckpt)
    assert_weights_match(weights, dense_final, overrides, loss_tol=1e-4)

    # The config rules come from the registry and the runtime too.
    with pytest.raises(ConfigError, match="parallel.mode=zero12 cannot use parallel.pp=2"):
        config.load(None, ["parallel.mode=zero12", "parallel.pp=2"])
    from gptscale.ds_templates import load_template

    with pytest.raises(ConfigError, match="uses ZeRO stage 3, but parallel.mode=zero12 keeps whole parameters"):
        load_template(config.load(None, ["parallel.mode=zero12", "train.ds_config=zero3"]))
