"""gptscale's own per-rank part of a checkpoint (the RNG states and the data position), stored
without pickle: the RNG states as integer tensors in a safetensors file, the rest as JSON in
its metadata. Loading it runs no code, whoever wrote the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptscale.atomic import atomic_write
from gptscale.errors import CheckpointError

_KEY = "gptscale_rank_state"


def save_rank_state(path: Path, data: dict[str, Any], rng: dict[str, Any]) -> None:
    """`data`: the loader's JSON state; `rng`: {"torch": ByteTensor, "numpy": np.random.get_state(),
    "python": random.getstate()} (runtime.base.rng_state)."""
    from safetensors.torch import save

    name, keys, pos, has_gauss, cached = rng["numpy"]
    version, words, gauss_next = rng["python"]
    tensors = {"torch": rng["torch"].clone(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "python_words": torch.tensor(words, dtype=torch.int64)}
    meta = {"data": data, "numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": [version, gauss_next]}
    with atomic_write(path) as f:
        f.write(save(tensors, metadata={_KEY: json.dumps(meta)}))


def load_rank_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data state, RNG states) as save_rank_state took them; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_KEY])
            tensors = {k: f.get_tensor(k) for k in ("torch", "numpy_keys", "python_words")}
        name, pos, has_gauss, cached = meta["numpy"]
        version, gauss_next = meta["python"]
        rng = {"torch": tensors["torch"].to(torch.uint8),
               "numpy": (str(name), tensors["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)),
               "python": (int(version), tuple(int(w) for w in tensors["python_words"].tolist()),
                          None if gauss_next is None else float(gauss_next))}
        if not isinstance(meta["data"], dict):
            raise TypeError("data is not a mapping")
        sizes = (rng["torch"].numel(), len(rng["numpy"][1]), len(rng["python"][1]))
        if sizes != (torch.get_rng_state().numel(), 624, 625) or rng["python"][0] != 3 or rng["numpy"][0] != "MT19937":
            raise ValueError(f"RNG states of the wrong kind or size {sizes}")
        return meta["data"], rng
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a gptscale rank state ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); the checkpoint is damaged or was "
                              f"written by another version") from None


def load_legacy_rank_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pickled `gptscale_rankNNNNN.pt` of checkpoints written before the safetensors format,
    read with weights_only=True: tensors, plain containers and numpy arrays only, no code run."""
    import pickle

    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
        return state["data"], state["rng"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as an earlier gptscale rank state ({first}); it is damaged "
                              f"or holds more than tensors and arrays (refused, not run)") from None
