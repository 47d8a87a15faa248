"""The sweep's three PNGs (matplotlib's Agg backend, no display): validation loss curves, final
loss against compute with the efficient frontier and the fit's compute-optimal line, and fitted
against measured loss. Small on purpose (the README shows them)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

FIGSIZE = (5.0, 3.4)
DPI = 80


def plot_sweep(sweep, records: list[dict], fit: dict | None) -> list[Path]:
    """loss_curves.png, loss_vs_compute.png and (with a fit) fit.png in the sweep's out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptscale.scaling.sweep import validation_curve

    sizes = list(dict.fromkeys(run.size for run in sweep.runs))
    colours = {size: plt.cm.viridis(i / max(1, len(sizes) - 1) * 0.9) for i, size in enumerate(sizes)}
    written = []

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    labelled = set()
    for run in sweep.runs:
        curve = [(t, v) for t, v in validation_curve(sweep, run) if t > 0 and math.isfinite(v)]
        if not curve:
            continue
        x, y = zip(*curve)
        label = None if run.size in labelled else f"{run.size} (N={sweep.n_of(run):,})"
        labelled.add(run.size)
        ax.plot(x, y, "-", color=colours[run.size], lw=1.2, alpha=0.9, label=label)
        ax.plot(x[-1], y[-1], "o", color=colours[run.size], ms=3.5)
    ax.set_xscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("validation loss per run (dot: final)", fontsize=10)
    _finish(ax, labelled)
    written.append(_save(fig, sweep.out_dir / "loss_curves.png"))

    done = [r for r in records if r["final_val_loss"] is not None and math.isfinite(r["final_val_loss"])]
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for size in sizes:
        points = [(r["C"], r["final_val_loss"]) for r in done if r["size"] == size]
        if points:
            ax.plot(*zip(*points), "o", color=colours[size], ms=5, label=size)
    frontier = _frontier([(r["C"], r["final_val_loss"]) for r in done])
    if frontier:
        ax.step(*zip(*frontier), where="post", color="black", lw=1, alpha=0.6, label="measured frontier")
    if fit and done and fit["budget"]["loss"] is not None:
        from gptscale.scaling.fit import ScalingLaw

        law = ScalingLaw(**fit["parameters"])
        c_lo = min(r["C"] for r in done) / 2
        c_hi = max(fit["budget"]["flops"], max(r["C"] for r in done)) * 1.5
        grid = np.geomspace(c_lo, c_hi, 60)
        optimum = [law.loss(*law.compute_optimal(c)) for c in grid]
        ax.plot(grid, optimum, "--", color="tab:red", lw=1.2, label="fit: compute-optimal")
        ax.plot([fit["budget"]["flops"]], [fit["budget"]["loss"]], "*", color="tab:red", ms=9,
                label=f"budget {fit['budget']['flops']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6 N D (FLOPs)")
    ax.set_ylabel("final validation loss")
    ax.set_title("loss vs compute", fontsize=10)
    _finish(ax, done)
    written.append(_save(fig, sweep.out_dir / "loss_vs_compute.png"))

    if fit:
        from gptscale.scaling.fit import ScalingLaw

        law = ScalingLaw(**fit["parameters"])
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        measured = np.array([r["final_val_loss"] for r in done])
        fitted = law.loss([r["N"] for r in done], [r["D"] for r in done])
        for size in sizes:
            mask = np.array([r["size"] == size for r in done])
            if mask.any():
                ax.plot(measured[mask], fitted[mask], "o", color=colours[size], ms=5, label=size)
        lo, hi = min(measured.min(), fitted.min()), max(measured.max(), fitted.max())
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "-", color="grey", lw=1, label="y = x")
        p = fit["parameters"]
        ax.text(0.02, 0.98, f"E={p['E']:.3g} A={p['A']:.3g} B={p['B']:.3g}\n"
                            f"alpha={p['alpha']:.3g} beta={p['beta']:.3g}",
                transform=ax.transAxes, va="top", fontsize=7, family="monospace")
        ax.set_xlabel("measured final validation loss")
        ax.set_ylabel("fitted L(N, D)")
        ax.set_title("fit vs measurement", fontsize=10)
        _finish(ax, done, loc="lower right")
        written.append(_save(fig, sweep.out_dir / "fit.png"))
    return written


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The measured efficient frontier: each run that reaches a lower loss than every run with less compute."""
    best, kept = math.inf, []
    for c, loss in sorted(points):
        if loss < best:
            best = loss
            kept.append((c, loss))
    return kept


def _finish(ax, anything, loc: str = "best") -> None:
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.tick_params(labelsize=8)
    if anything:
        ax.legend(fontsize=7, loc=loc)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from gptscale.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
