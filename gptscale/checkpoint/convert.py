"""Open whatever a user points a conversion at: a training checkpoint (any mode and layout),
a canonical folder or a Hugging Face folder, each as a source of canonical tensors."""
from __future__ import annotations

from pathlib import Path

from gptscale.checkpoint.canonical import CanonicalFolder, Source, is_canonical
from gptscale.checkpoint.layout import COMPLETE
from gptscale.checkpoint.read import CheckpointReader
from gptscale.errors import CheckpointError


def open_source(path: str | Path) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a RUN/checkpoints/stepNNNNNNNN checkpoint, a canonical "
                              f"folder ('gptscale convert consolidate') or a Hugging Face model folder")
    if (path / COMPLETE).is_file():
        return CheckpointReader(path)
    if is_canonical(path):
        return CanonicalFolder(path)
    raise CheckpointError(f"{path} is neither a complete gptscale checkpoint ({COMPLETE}) nor a canonical folder "
                          f"(config.yaml + model.safetensors)")
