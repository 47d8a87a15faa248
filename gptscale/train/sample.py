"""Text from a model: `gptscale generate` on a checkpoint (in one process), and the sample at
the end of a run (from the live model where its mode allows, else from the final checkpoint)."""
from __future__ import annotations

from pathlib import Path

import torch

from gptscale.checkpoint.adapter import AdapterFolder
from gptscale.checkpoint.convert import open_source
from gptscale.checkpoint.read import CheckpointReader
from gptscale.checkpoint.layout import TOKENIZER, CheckpointMeta
from gptscale.config import RunConfig, TrainConfig
from gptscale.convert.tp import split_tp
from gptscale.data.sft import chat_prompt_ids
from gptscale.data.shards import matching_tokenizer, read_manifest
from gptscale.data.tokenizer import TextTokenizer
from gptscale.errors import ConfigError
from gptscale.model.counting import count_parameters
from gptscale.model.generate import generate
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import split_table
from gptscale.parallel.lora import add_lora

LARGEST_SAMPLED_MODEL = 2_000_000_000  # parameters; bigger ones are not consolidated onto one rank for a sample


def generate_from_checkpoint(checkpoint: str | Path, prompt: str, *, max_new_tokens: int = 64,
                             temperature: float = TrainConfig.sample_temperature,
                             top_k: int | None = TrainConfig.sample_top_k, seed: int = 0,
                             tokenizer: str | None = None, adapter: str | None = None, chat: bool = False) -> str:
    """`checkpoint`: a training checkpoint (any mode and layout), a canonical folder or a
    Hugging Face folder; `adapter`: LoRA adapters (an adapter folder or a LoRA checkpoint) to
    apply to it; `chat`: `prompt` is a user's message, rendered with the fine-tuning template
    (the text is then the answer alone)."""
    cfg, model, tok = load_dense_model(checkpoint, tokenizer, adapter)
    ids = chat_prompt_ids(tok, prompt) if chat else tok.encode(prompt)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens; give some text")
    budget = min(max_new_tokens, cfg.model.block_size - len(ids))
    out = generate(model, torch.tensor([ids]), budget, temperature=temperature, top_k=top_k,
                   generator=torch.Generator().manual_seed(seed), stop_token=tok.eos_id)[0].tolist()
    if chat:
        answer = out[len(ids):]
        return tok.decode(answer[:answer.index(tok.eos_id)] if tok.eos_id in answer else answer)
    return tok.decode(out)


def load_dense_model(checkpoint: str | Path, tokenizer: str | None = None,
                     adapter: str | None = None) -> tuple[RunConfig, GPT, TextTokenizer]:
    """(config, the whole model in this process, its tokenizer) from any source of weights
    (with the adapters a LoRA checkpoint holds), plus `adapter`'s LoRA adapters if given."""
    source = open_source(checkpoint)
    cfg = source.cfg
    weights = {name: source.tensor(name) for name in source.names}
    if isinstance(source, CheckpointReader):
        tok = checkpoint_tokenizer(Path(checkpoint), cfg, tokenizer)
    elif tokenizer is not None or source.tokenizer_dir is not None:
        tok = TextTokenizer.load(tokenizer if tokenizer is not None else source.tokenizer_dir)
    else:
        raise ConfigError(f"{checkpoint} holds no tokenizer; pass --tokenizer")
    model = GPT(cfg.model)
    lora = cfg.lora
    if adapter is not None:
        if lora is not None:
            raise ConfigError(f"{checkpoint} already carries LoRA adapters; give a base (or 'gptscale lora merge' "
                              f"it first) to apply --adapter {adapter}")
        folder = AdapterFolder(adapter, cfg.model, checkpoint)
        lora = folder.lora
        weights.update(folder.tensors())
    if lora is not None:
        add_lora(model, lora, seed=0)
    model.load_state_dict(split_tp(weights, split_table(model), 1, model.padded_vocab)[0])
    return cfg, model, tok


def checkpoint_tokenizer(ckpt: Path, cfg: RunConfig, given: str | None) -> TextTokenizer:
    """The tokenizer a checkpoint was trained with: its own copy, or `given` if it is the same
    one (by hash), or for older checkpoints the training data's."""
    expected = CheckpointMeta.read(ckpt).tokenizer_sha256
    if given is not None or (ckpt / TOKENIZER).is_dir():
        tok = TextTokenizer.load(given if given is not None else ckpt / TOKENIZER)
        if expected is not None and tok.sha256 != expected:
            raise ConfigError(f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}...) is not the tokenizer {ckpt} was "
                              f"trained with (sha256 {expected[:12]}...); use the checkpoint's own copy (no "
                              f"--tokenizer) or the training data's")
        return tok
    if cfg.data.path is not None:
        return matching_tokenizer(cfg.data.path, read_manifest(cfg.data.path))
    raise ConfigError("the checkpoint was trained on synthetic data; pass --tokenizer")


def sample_live(model: GPT, tokenizer, cfg: RunConfig, device) -> str:
    """The run's sample from a live model that every rank runs together (ZeRO-3 gathers each layer)."""
    t = cfg.train
    prompt = torch.tensor([tokenizer.encode(t.sample_prompt)], device=device)
    g = torch.Generator(device=device).manual_seed(t.seed)
    out = generate(model, prompt, t.sample_tokens, temperature=t.sample_temperature, top_k=t.sample_top_k,
                   generator=g, stop_token=tokenizer.eos_id)
    return tokenizer.decode(out[0].tolist())


def sample_from_checkpoint(final: Path, cfg: RunConfig) -> str:
    """The run's sample from its final checkpoint, consolidated into one dense model (one rank)."""
    if count_parameters(cfg.model).total > LARGEST_SAMPLED_MODEL:
        return f"(model too large to sample on one rank; run: gptscale generate {final})"
    t = cfg.train
    return generate_from_checkpoint(final, t.sample_prompt, max_new_tokens=t.sample_tokens,
                                    temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed)
