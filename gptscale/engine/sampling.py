"""`gptscale generate`: text from a training checkpoint, in one process."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from gptscale.config import ConfigError
from gptscale.convert.tp import split_tp
from gptscale.data.shards import matching_tokenizer, read_manifest
from gptscale.data.tokenizer import TextTokenizer
from gptscale.engine.consolidate import consolidate
from gptscale.model.generate import generate
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import split_table


def generate_from_checkpoint(checkpoint: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                             top_k: int | None = 50, seed: int = 0, tokenizer: str | None = None) -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every file it reads
        cfg, weights = consolidate(checkpoint)
    if tokenizer is not None:
        tok = TextTokenizer.load(tokenizer)
    elif cfg.data.path is not None:
        tok = matching_tokenizer(cfg.data.path, read_manifest(cfg.data.path))
    else:
        raise ConfigError("the checkpoint was trained on synthetic data; pass --tokenizer")
    model = GPT(cfg.model)
    model.load_state_dict(split_tp(weights, split_table(model), 1, model.padded_vocab)[0])
    ids = tok.encode(prompt)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens; give some text")
    budget = min(max_new_tokens, cfg.model.block_size - len(ids))
    out = generate(model, torch.tensor([ids]), budget, temperature=temperature, top_k=top_k,
                   generator=torch.Generator().manual_seed(seed), stop_token=tok.eos_id)
    return tok.decode(out[0].tolist())


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
