"""`gptscale plot RUN`: a run's loss curves as a PNG (matplotlib, no display needed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

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


def plot_run(run_dir: str | Path) -> Path:
    """loss.png in the run folder: training and validation loss against tokens seen (steps
    when a record lacks the token count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptscale.atomic import atomic_write

    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist; is {run} a gptscale run folder?")
    records = read_metrics(metrics)
    train = [r for r in records if _number(r.get("loss"))]
    val = [r for r in records if _number(r.get("val_loss"))]
    by_tokens = bool(train) and all(_number(r.get("tokens")) for r in train)
    x_of = {r["step"]: (r["tokens"] if by_tokens else r["step"]) for r in train}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([x_of[r["step"]] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([x_of.get(r["step"], 0 if r["step"] == 0 else float("nan")) for r in val],
                [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("tokens" if by_tokens else "step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{run.name}: {len(train)} logged steps")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run / "loss.png"
    with atomic_write(out) as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
    return out
