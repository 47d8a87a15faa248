"""The scaling law L(N, D) = E + A / N^alpha + B / D^beta fitted to final losses, its bootstrap
intervals and the compute-optimal model size and token count for a budget (pure math: numpy).

The fit is Chinchilla's approach 3 (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", section 3.3 and appendix D.2), as replicated by Besiroglu et al. 2024
("Chinchilla Scaling: A replication attempt"): with a = log A, b = log B, e = log E, minimise

    sum_i  Huber_delta( LSE(a - alpha log N_i,  b - beta log D_i,  e) - log L_i ),  delta = 1e-3

over (a, b, e, alpha, beta) with L-BFGS, started from every point of the grid
alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4,500 starts),
keeping the best. LSE is log-sum-exp, so the fit is made on log L (relative errors) and stays
positive by construction.

All starts (and all bootstrap resamples) are minimised together: the L-BFGS below is batched,
one independent L-BFGS (two-loop recursion, 20 pairs of memory, backtracking Armijo line
search) per row, so the paper's whole grid takes about a second instead of minutes of one
optimiser call per start.

Bootstrap (Besiroglu et al. 2024, section 3): resample the runs with replacement, refit, take
percentiles. A resample is the original points weighted by how often each was drawn, so every
resample is one more batch of rows. Each resample starts from the full fit's distinct local
minima (the 32 best), not from the whole grid: a resample's landscape is a perturbation of
the full one.

Compute-optimal allocation for C = 6 N D FLOPs (Hoffmann et al. 2022, appendix D.3, eq. 4):
N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
G = (alpha A / (beta B))^(1/(alpha+beta)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gptscale.errors import DataError

PARAMETERS = ("E", "A", "B", "alpha", "beta")
FREE_PARAMETERS = len(PARAMETERS)
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2


def paper_grid() -> np.ndarray:
    """The 4,500 initialisations of Hoffmann et al. 2022 (appendix D.2), as rows (a, b, e, alpha, beta)."""
    alphas = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.1, 5.0)
    a, b, e, alpha, beta = np.meshgrid(abs_, abs_, es, alphas, alphas, indexing="ij")
    return np.stack([a.ravel(), b.ravel(), e.ravel(), alpha.ravel(), beta.ravel()], axis=1)


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_logs(cls, row) -> ScalingLaw:
        a, b, e, alpha, beta = (float(v) for v in row)
        return cls(E=_exp(e), A=_exp(a), B=_exp(b), alpha=alpha, beta=beta)

    def loss(self, n, d):
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L under 6 N D = flops (Hoffmann et al. 2022, eq. 4)."""
        return compute_optimal(self, flops)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAMETERS}


def _exp(value: float) -> float:
    """exp, inf past the largest double (a runaway bootstrap fit) instead of OverflowError."""
    return math.exp(value) if value < 709.0 else math.inf


def compute_optimal(law: ScalingLaw, flops: float) -> tuple[float, float]:
    """N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, appendix D.3).
    NaNs where the law has no finite optimum (alpha or beta <= 0)."""
    if not (law.alpha > 0 and law.beta > 0 and flops > 0 and all(0 < v < math.inf for v in (law.A, law.B))):
        return float("nan"), float("nan")
    total = law.alpha + law.beta
    # in logs: A, B may be exp(25) and (C/6)^x large
    log_g = (math.log(law.alpha) + math.log(law.A) - math.log(law.beta) - math.log(law.B)) / total
    log_c = math.log(flops / 6.0)
    return math.exp(log_g + law.beta / total * log_c), math.exp(-log_g + law.alpha / total * log_c)


@dataclass(frozen=True)
class Fit:
    law: ScalingLaw
    objective: float  # the summed Huber loss at the optimum
    points: int  # finite (N, D, L) points fitted
    skipped: tuple[str, ...] = ()  # why points were left out
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # parameter -> (low, high)
    level: float | None = None  # of the intervals (e.g. 0.9)
    samples: tuple[dict[str, float], ...] = ()  # the bootstrap fits


def fit_scaling_law(n, d, loss, *, delta: float = HUBER_DELTA, starts: np.ndarray | None = None,
                    bootstrap: int = 0, level: float = 0.9, seed: int = 0) -> Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to points (n[i], d[i], loss[i]) by Chinchilla's
    approach 3; with `bootstrap` resamples, percentile intervals at `level` for each parameter."""
    n, d, loss, skipped = _finite_points(n, d, loss)
    ln, ld, ll = np.log(n), np.log(d), np.log(loss)
    grid = paper_grid() if starts is None else np.asarray(starts, dtype=np.float64).reshape(-1, 5)
    x, f = minimise(grid, ln, ld, ll, np.ones((1, len(ll))), delta)
    order = np.argsort(f, kind="stable")
    best = x[order[0]]
    intervals, samples = {}, ()
    if bootstrap:
        minima = _distinct(x[order], 32)
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, len(ll), len(ll)), minlength=len(ll))
                           for _ in range(bootstrap)]).astype(np.float64)  # (R, P)
        rows = np.repeat(counts, len(minima), axis=0)  # resample r's starts are rows r*K .. r*K+K-1
        xb, fb = minimise(np.tile(minima, (bootstrap, 1)), ln, ld, ll, rows, delta)
        fb = fb.reshape(bootstrap, len(minima))
        winners = xb.reshape(bootstrap, len(minima), 5)[np.arange(bootstrap), np.argmin(fb, axis=1)]
        samples = tuple(ScalingLaw.from_logs(row).as_dict() for row in winners)
        tail = (1.0 - level) / 2 * 100
        for i, name in enumerate(("A", "B", "E", "alpha", "beta")):  # the columns of `winners`
            low, high = np.percentile(winners[:, i], [tail, 100 - tail])  # E, A, B: in logs, then exp
            intervals[name] = (_exp(low), _exp(high)) if name in "ABE" else (float(low), float(high))
        intervals = {name: intervals[name] for name in PARAMETERS}
    return Fit(law=ScalingLaw.from_logs(best), objective=float(f[order[0]]), points=len(ll), skipped=skipped,
               intervals=intervals, level=level if bootstrap else None, samples=samples)


# A bootstrap interval wider than this does not pin a parameter down: a scale (E, A, B) spanning
# more than a factor of 10, an exponent (alpha, beta) more than 0.5 wide.
LOOSE_RATIO, LOOSE_WIDTH = 10.0, 0.5


def poorly_constrained(intervals: dict[str, tuple[float, float]]) -> list[str]:
    """The parameters whose bootstrap interval is too wide to mean anything: the runs do not
    separate them (e.g. runs far from convergence cannot tell the irreducible loss E from the
    power laws), so neither the law nor its compute-optimal answer should be trusted."""
    loose = []
    for name, (low, high) in intervals.items():
        if name in ("alpha", "beta"):
            if not high - low <= LOOSE_WIDTH:
                loose.append(name)
        elif not (low > 0 and high / low <= LOOSE_RATIO):
            loose.append(name)
    return loose


def optimum_intervals(fit: Fit, flops: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of N_opt and D_opt at `flops` over the bootstrap fits (empty without)."""
    if not fit.samples:
        return {}
    pairs = np.array([compute_optimal(ScalingLaw(**s), flops) for s in fit.samples])
    pairs = pairs[np.isfinite(pairs).all(axis=1)]
    if not len(pairs):
        return {}
    tail = (1.0 - fit.level) / 2 * 100
    return {name: (float(np.percentile(pairs[:, i], tail)), float(np.percentile(pairs[:, i], 100 - tail)))
            for i, name in enumerate(("N_opt", "D_opt"))}


def _finite_points(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    n, d, loss = (np.asarray(v, dtype=np.float64).ravel() for v in (n, d, loss))
    if not n.shape == d.shape == loss.shape:
        raise DataError(f"the fit needs as many N ({n.size}), D ({d.size}) and losses ({loss.size})")
    good = np.isfinite(n) & np.isfinite(d) & np.isfinite(loss) & (n > 0) & (d > 0) & (loss > 0)
    skipped = tuple(f"point {i} (N={n[i]:.4g}, D={d[i]:.4g}, L={loss[i]:.4g}) is not finite and positive: skipped"
                    for i in np.flatnonzero(~good))
    n, d, loss = n[good], d[good], loss[good]
    if n.size < FREE_PARAMETERS:
        raise DataError(f"the fit of L(N, D) = E + A/N^alpha + B/D^beta has {FREE_PARAMETERS} free parameters and "
                        f"needs at least {FREE_PARAMETERS} runs with a finite final loss; got {n.size} (add model "
                        f"sizes or token budgets, or let more runs finish)")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise DataError(f"the fit needs at least 2 different model sizes and 2 different token counts; got "
                        f"{len(np.unique(n))} size(s) and {len(np.unique(d))} token count(s)")
    return n, d, loss, skipped


def _distinct(x: np.ndarray, most: int) -> np.ndarray:
    """Up to `most` rows of `x` (in order) that differ from every earlier one by > 1e-3."""
    kept: list[np.ndarray] = []
    for row in x:
        if np.all(np.isfinite(row)) and all(np.max(np.abs(row - k)) > 1e-3 for k in kept):
            kept.append(row)
            if len(kept) == most:
                break
    return np.array(kept)


def objective(x: np.ndarray, ln, ld, ll, weights: np.ndarray, delta: float = HUBER_DELTA):
    """Summed Huber loss of LSE(a - alpha ln, b - beta ld, e) - ll, and its gradient, for each
    row of x = (a, b, e, alpha, beta) (shape (S, 5)); weights: (S, P) or (1, P) point counts."""
    u1 = x[:, 0:1] - x[:, 3:4] * ln  # (S, P)
    u2 = x[:, 1:2] - x[:, 4:5] * ld
    u3 = np.broadcast_to(x[:, 2:3], u1.shape)
    top = np.maximum(np.maximum(u1, u2), u3)
    e1, e2, e3 = np.exp(u1 - top), np.exp(u2 - top), np.exp(u3 - top)
    total = e1 + e2 + e3
    r = top + np.log(total) - ll
    size = np.abs(r)
    huber = np.where(size <= delta, 0.5 * r * r, delta * (size - 0.5 * delta))
    f = np.sum(weights * huber, axis=1)
    slope = weights * np.clip(r, -delta, delta) / total  # dHuber/dr * dLSE/du_k = slope * e_k
    g1, g2, g3 = slope * e1, slope * e2, slope * e3
    grad = np.stack([g1.sum(1), g2.sum(1), g3.sum(1), -(g1 * ln).sum(1), -(g2 * ld).sum(1)], axis=1)
    return f, grad


def minimise(x0: np.ndarray, ln, ld, ll, weights: np.ndarray, delta: float = HUBER_DELTA, *,
             iterations: int = 400, memory: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Batched L-BFGS (Nocedal & Wright, algorithm 7.4, with a backtracking Armijo line search):
    each row of x0 (S, 5) is its own problem (`weights` row s, or one row for all). Returns the
    minimisers and their objectives."""
    x = np.array(x0, dtype=np.float64)
    f, g = objective(x, ln, ld, ll, weights, delta)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    rho_hist: list[np.ndarray] = []
    active = np.isfinite(f)
    last_step = np.ones(len(x))
    for _ in range(iterations):
        rows = np.flatnonzero(active)  # converged rows are left alone
        if not rows.size:
            break
        w = weights if weights.shape[0] == 1 else weights[rows]
        xr, fr, gr = x[rows], f[rows], g[rows]
        direction = -_two_loop(gr, [h[rows] for h in s_hist], [h[rows] for h in y_hist], [h[rows] for h in rho_hist])
        slope = np.sum(direction * gr, axis=1)
        uphill = ~(slope < 0)
        direction[uphill], slope[uphill] = -gr[uphill], -np.sum(gr[uphill] ** 2, axis=1)
        if not s_hist:  # first step: a unit step along the gradient is a guess of the wrong scale
            scale = np.minimum(1.0, 1.0 / np.maximum(np.sqrt(np.sum(gr * gr, axis=1)), 1e-300))
            direction *= scale[:, None]
            slope *= scale
        step = np.minimum(1.0, 4.0 * last_step[rows])  # start near the step that worked last time
        accepted = np.zeros(rows.size, dtype=bool)
        x_new, f_new, g_new = xr.copy(), fr.copy(), gr.copy()
        for _ in range(20):  # step >= 2^-19: a well-scaled L-BFGS direction needs few halvings
            trial = np.flatnonzero(~accepted)
            if not trial.size:
                break
            xt = xr[trial] + step[trial, None] * direction[trial]
            ft, gt = objective(xt, ln, ld, ll, w if w.shape[0] == 1 else w[trial], delta)
            ok = np.isfinite(ft) & (ft <= fr[trial] + 1e-4 * step[trial] * slope[trial])
            x_new[trial[ok]], f_new[trial[ok]], g_new[trial[ok]] = xt[ok], ft[ok], gt[ok]
            accepted[trial[ok]] = True
            step[trial[~ok]] *= 0.5
        # no decrease along the direction, or none worth a step: converged as far as doubles tell
        s, y = np.zeros_like(x), np.zeros_like(x)
        s[rows], y[rows] = x_new - xr, g_new - gr
        sy = np.sum(s * y, axis=1)
        progress = fr - f_new
        active[rows] = accepted & (progress > 1e-15 * np.maximum(np.abs(fr), 1e-30)) & \
            (np.max(np.abs(g_new), axis=1) > 1e-14)
        x[rows], f[rows], g[rows] = x_new, f_new, g_new
        last_step[rows] = np.where(accepted, step, 1.0)
        rho = np.where(sy > 1e-18, 1.0 / np.where(sy > 1e-18, sy, 1.0), 0.0)  # 0: the pair does not count
        s_hist.append(s), y_hist.append(y), rho_hist.append(rho)
        if len(s_hist) > memory:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
    return x, np.where(np.isfinite(f), f, np.inf)


def _two_loop(g: np.ndarray, s_hist, y_hist, rho_hist) -> np.ndarray:
    """H g for each row, H the L-BFGS inverse-Hessian approximation (Nocedal & Wright, alg. 7.4)."""
    q = g.copy()
    alphas = []
    for s, y, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
        a = rho * np.sum(s * q, axis=1)
        q -= a[:, None] * y
        alphas.append(a)
    if s_hist:
        s, y, rho = s_hist[-1], y_hist[-1], rho_hist[-1]
        yy = np.sum(y * y, axis=1)
        gamma = np.where((rho > 0) & (yy > 0), np.sum(s * y, axis=1) / np.where(yy > 0, yy, 1.0), 1.0)
        q *= gamma[:, None]
    for (s, y, rho), a in zip(zip(s_hist, y_hist, rho_hist), reversed(alphas)):
        b = rho * np.sum(y * q, axis=1)
        q += (a - b)[:, None] * s
    return q
