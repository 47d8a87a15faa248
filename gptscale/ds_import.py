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


# -- reading DeepSpeed's checkpoint files without running code ---------------------------------
# DeepSpeed unpickles its files with weights_only=False: a file from elsewhere could run any
# code. These readers allow tensors, plain containers and the few records DeepSpeed itself
# stores, nothing else (found by torch.serialization.get_unsafe_globals_in_checkpoint on
# zero3, pipe and pipe_zero3 checkpoints of DeepSpeed 0.19).

def _deepspeed_records() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_without_code(path, map_location=None, **kwargs):
    """torch.load of one DeepSpeed checkpoint file, refusing anything that is not a tensor, a
    plain container or one of DeepSpeed's records (CheckpointError naming the file)."""
    import pickle

    import torch

    from gptscale.errors import CheckpointError

    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(_deepspeed_records()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be loaded as a DeepSpeed checkpoint file ({first[:200]}); it is "
                              f"damaged, or holds Python objects that are not DeepSpeed's (refused, not run)") from None


def scan_without_code(paths) -> None:
    """Check DeepSpeed checkpoint files before anything reads them: each must be a torch zip
    file whose pickle names no class but DeepSpeed's records (nothing is unpickled here)."""
    import torch

    from gptscale.errors import CheckpointError

    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _deepspeed_records()}
    for path in paths:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except Exception as exc:  # noqa: BLE001 - any failure to parse is a damaged file
            raise CheckpointError(f"{path} is not a torch checkpoint file ({type(exc).__name__}); it is damaged or "
                                  f"not DeepSpeed's") from None
        if unsafe:
            raise CheckpointError(f"{path} names Python objects that are not DeepSpeed's ({', '.join(sorted(unsafe))}); "
                                  f"refused, not run")


def guard_engine_loads(engine) -> None:
    """Make this engine read its checkpoint files with `load_without_code` (instance attribute;
    DeepSpeed's own TorchCheckpointEngine.load unpickles anything)."""
    engine.checkpoint_engine.load = lambda path, map_location=None: load_without_code(path, map_location)
