"""`gptscale plot RUN`: a run's loss curves as a PNG (matplotlib, no display needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gptscale.errors import DataError


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, each checked to be a JSON object (the file may be damaged)."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{path}:{number}: not a JSON record ({type(exc).__name__}); the file is damaged") from None
        if not isinstance(record, dict) or not _number(record.get("step")):
            raise DataError(f"{path}:{number}: a record needs a numeric 'step'; the file is damaged")
        records.append(record)
    return records


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves(records: list[dict]) -> tuple[str, list[tuple[float, float]], list[tuple[float, float]]]:
    """(x label, train points, validation points) of a run's metrics, x in tokens seen (steps
    when a training record lacks the token count). Every validation record is placed, also the
    one before training (step 0, x 0) and ones at steps no training record was logged at (x
    interpolated between the logged steps' token counts, or extrapolated at the last rate)."""
    train = [r for r in records if _number(r.get("loss"))]
    val = [r for r in records if _number(r.get("val_loss"))]
    by_tokens = bool(train) and all(_number(r.get("tokens")) for r in train)
    if not by_tokens:
        x_of = float
    else:
        logged = {0: 0.0, **{r["step"]: float(r["tokens"]) for r in train}}
        steps = sorted(logged)
        last = steps[-1]
        rate = logged[last] / last if last else 0.0  # tokens per step so far, for points past the last record

        def x_of(step: float) -> float:
            if step > last:
                return logged[last] + (step - last) * rate
            return float(np.interp(step, steps, [logged[s] for s in steps]))

    return ("tokens" if by_tokens else "step", [(x_of(r["step"]), r["loss"]) for r in train],
            [(x_of(r["step"]), r["val_loss"]) for r in val])


def plot_run(run_dir: str | Path) -> Path:
    """loss.png in the run folder: training and validation loss against tokens seen (steps
    when a record lacks the token count), from step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptscale.atomic import atomic_write

    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist; is {run} a gptscale run folder?")
    xlabel, train, val = curves(read_metrics(metrics))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([x for x, _ in train], [y for _, y in train], label="train", lw=1)
    if val:
        ax.plot([x for x, _ in val], [y for _, y in val], "o-", label="validation")
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{run.name}: {len(train)} logged steps")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run / "loss.png"
    with atomic_write(out) as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
    return out
