"""The one door to DeepSpeed: import it with the right accelerator. On a machine without
CUDA, DeepSpeed must be told to use its CPU accelerator before it is first imported, so
gptscale's modules call `import_deepspeed()` instead of `import deepspeed`."""
from __future__ import annotations

import os
import re


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def import_deepspeed():
    if not on_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        _readable_arch_list()
    import deepspeed

    return deepspeed


def _readable_arch_list() -> None:
    """DeepSpeed 0.19's JIT builder reads TORCH_CUDA_ARCH_LIST entries as numbers and fails on
    the arch-specific suffix ("9.0a", "12.0f") that CUDA 12/13 images set (seen on an H200 with
    torch 2.11+cu130: `invalid literal for int() with base 10: '0a'`). Its ops need no
    arch-specific instructions, so the plain compute capability serves."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        entries = re.sub(r"(\d+\.\d+)[af]\b", r"\1", value).replace(";", " ").split()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(dict.fromkeys(entries))
