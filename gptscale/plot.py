"""`gptscale plot RUN`: a run's loss curves as a PNG (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_run(run_dir: str | Path) -> Path:
    """loss.png in the run folder: training and validation loss against tokens seen."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptscale.atomic import atomic_write

    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist; is {run} a gptscale run folder?")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    tokens_at = {r["step"]: r["tokens"] for r in train}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([tokens_at.get(r["step"], float("nan")) for r in val], [r["val_loss"] for r in val], "o-",
                label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{run.name}: {len(train)} logged steps")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run / "loss.png"
    with atomic_write(out) as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
    return out
