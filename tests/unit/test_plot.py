"""The loss plot's curves: every validation point placed, from step 0."""
import json

from gptscale.plot import curves, plot_run


def test_curves_start_at_step_zero_and_place_every_validation_point(tmp_path):
    records = [{"step": 0, "val_loss": 8.3}]
    records += [{"step": s, "loss": 8.0 - s / 100, "tokens": 2048 * s} for s in (5, 10, 15, 20)]
    records += [{"step": 10, "val_loss": 7.0}, {"step": 12, "val_loss": 6.9}, {"step": 22, "val_loss": 6.8}]
    label, train, val = curves(records)
    assert label == "tokens"
    assert train[0] == (10240, 7.95) and len(train) == 4
    # before training at 0; a logged step; between logged steps (interpolated); past the last one (its rate)
    assert val == [(0, 8.3), (20480, 7.0), (12 * 2048, 6.9), (22 * 2048, 6.8)]
    assert curves([{"step": 0, "val_loss": 8.3}, {"step": 3, "loss": 7.0}])[2] == [(0.0, 8.3)]  # steps, no tokens

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert plot_run(tmp_path).read_bytes()[:4] == b"\x89PNG"
