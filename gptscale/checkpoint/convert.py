"""Open whatever a user points a conversion (or train.init_from) at: a training checkpoint (any
mode and layout), a canonical folder or file, or a Hugging Face folder, each as a source of
canonical tensors (checkpoint/canonical.py's `Source`)."""
from __future__ import annotations

from pathlib import Path

from gptscale.checkpoint.canonical import CanonicalFile, CanonicalFolder, Source, is_canonical
from gptscale.checkpoint.hf_folder import HFFolder, is_hf_folder
from gptscale.checkpoint.layout import COMPLETE, TOKENIZER, CheckpointMeta
from gptscale.checkpoint.read import CheckpointReader
from gptscale.errors import CheckpointError, ConfigError


def open_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a RUN/checkpoints/stepNNNNNNNN checkpoint, a canonical "
                              f"folder ('gptscale convert consolidate') or a Hugging Face model folder")
    if (path / COMPLETE).is_file():
        return CheckpointReader(path, open_base=open_weights)
    if is_canonical(path):
        return CanonicalFolder(path)
    if is_hf_folder(path):
        return HFFolder(path)
    raise CheckpointError(f"{path} is neither a complete gptscale checkpoint ({COMPLETE}), a canonical folder "
                          f"(config.yaml + model.safetensors) nor a Hugging Face model folder (config.json)")


def open_weights(path: str | Path, model_cfg) -> Source:
    """`open_source`, or a single canonical safetensors file for a model of `model_cfg`."""
    path = Path(path)
    if path.is_file():
        return CanonicalFile(path, model_cfg)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    return open_source(path)


def tokenizer_sha256_of(path: str | Path) -> str | None:
    """The sha256 of the tokenizer a source of weights was trained with (its tokenizer.json),
    or None where it does not say (a single weights file, synthetic data, no tokenizer files)."""
    from gptscale.data.tokenizer import TextTokenizer

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / COMPLETE).is_file():
        return CheckpointMeta.read(path).tokenizer_sha256
    for folder in (path / TOKENIZER, path):
        if (folder / "tokenizer.json").is_file():
            return TextTokenizer.load(folder).sha256
    return None


def check_same_tokenizer(weights: str | Path, tokenizer, data: str | Path) -> None:
    """One line when the data was tokenized with another tokenizer than the weights learned:
    with the same vocabulary size nothing else would notice, and training would be garbage."""
    expected = tokenizer_sha256_of(weights)
    if expected is not None and tokenizer is not None and tokenizer.sha256 != expected:
        raise ConfigError(f"data.path={data} was tokenized with another tokenizer (sha256 {tokenizer.sha256[:12]}...) "
                          f"than train.init_from={weights} was trained with ({expected[:12]}...); prepare the data "
                          f"with the model's tokenizer (its tokenizer/ folder)")


def consolidate(path: str | Path) -> tuple:
    """(the run config, canonical fp32 weights) of the checkpoint folder `path`, all in memory
    (for `generate` and tests; `gptscale convert` streams instead)."""
    reader = open_source(path)
    return reader.cfg, dict(reader.items())
