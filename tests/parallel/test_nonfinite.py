"""Non-finite gradients with a finite loss (what an absurd learning rate or a bad kernel gives):
counted in every mode, never saved, and after train.max_nonfinite in a row the run stops naming
the newest good checkpoint, which keep-K left intact."""
import json

import pytest

from gptscale import config
from gptscale.testing.distributed import run_ranks
from tests.parallel.training import ENV, SMALL_LLAMA, synthetic

pytestmark = pytest.mark.dist
FIRST_BAD = 4


def _train_with_nan_gradients(overrides):
    """Rank body: from step FIRST_BAD on, one parameter of this rank gets NaN gradients."""
    from gptscale.train.loop import Trainer

    cfg = config.load(None, overrides)
    trainer = Trainer(cfg, "none")
    param = next(iter(trainer.runtime.canonical_parameters().values()))
    backwards = [0]

    def poison(grad):
        backwards[0] += 1
        bad = backwards[0] > (FIRST_BAD - 1) * cfg.train.grad_accum
        return grad * float("nan") if bad else grad

    param.register_hook(poison)
    try:
        trainer.run()
    except FloatingPointError as err:
        return str(err)
    return None


@pytest.mark.parametrize("mode", [["parallel.mode=zero3"], ["parallel.pp=2"],
                                  ["parallel.mode=pipe_zero3", "parallel.pp=2"]])
def test_nan_gradients_are_counted_never_saved_and_stop_the_run(tmp_path, mode):
    overrides = synthetic(tmp_path, "nan", *mode, "train.steps=20", "train.save_every=1", "train.keep_checkpoints=2",
                          "train.max_nonfinite=3", model=SMALL_LLAMA)
    errors = run_ranks(_train_with_nan_gradients, 2, overrides, timeout=300, env=ENV)
    run_dir = tmp_path / "nan"
    last_good = run_dir / "checkpoints" / f"step{FIRST_BAD - 1:08d}"
    for error in errors:
        assert error is not None and "3 consecutive steps had a non-finite loss or gradient norm" in error, errors
        assert f"the newest good checkpoint is {last_good}" in error
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if (p / "COMPLETE.json").is_file())
    assert saved == [f"step{FIRST_BAD - 2:08d}", f"step{FIRST_BAD - 1:08d}"]  # good ones kept, bad ones never saved
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == list(range(1, FIRST_BAD + 3))  # stopped after the third bad step
    assert [steps[s]["nonfinite_skipped"] for s in sorted(steps)] == [0] * (FIRST_BAD - 1) + [1, 2, 3]
