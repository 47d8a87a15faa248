"""Numbers on paper about a run's scale: hardware peaks, the pipeline bubble (and, next, the
estimator, layout search, sweeps and fits). Imports no torch.distributed and no deepspeed."""
