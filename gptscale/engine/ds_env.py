"""Import DeepSpeed with the right accelerator: on a machine without CUDA, DeepSpeed must be
told to use its CPU accelerator before it is first imported."""
from __future__ import annotations

import os


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def import_deepspeed():
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed
