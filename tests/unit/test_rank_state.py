"""gptscale's per-rank checkpoint state: round trip without pickle, the earlier pickled format
read without running code, and damaged files refused with one error."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from gptscale.checkpoint.rank_state import load_legacy_rank_state, load_rank_state, save_rank_state
from gptscale.errors import CheckpointError
from gptscale.runtime.base import rng_state, set_rng_state


def test_the_rng_and_data_position_round_trip_exactly(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    data = {"version": 2, "workers": {"0": {"windows": 7, "positions": []}}, "corpora": [["ab" * 32]]}
    state = rng_state()
    save_rank_state(tmp_path / "r.safetensors", data, state)
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    loaded_data, loaded_rng = load_rank_state(tmp_path / "r.safetensors")
    set_rng_state(loaded_rng)
    assert loaded_data == data
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2:] == expected[2:]


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_earlier_pickled_format_is_read_without_running_code(tmp_path):
    legacy = tmp_path / "gptscale_rank00000.pt"
    torch.save({"data": {"position": 3}, "rng": rng_state()}, legacy)  # what gptscale wrote before
    data, rng = load_legacy_rank_state(legacy)
    assert data == {"position": 3} and rng["numpy"][1].dtype == np.uint32
    marker = tmp_path / "ran"
    torch.save({"data": _Trap(marker), "rng": {}}, legacy)
    with pytest.raises(CheckpointError, match="refused, not run"):
        load_legacy_rank_state(legacy)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["pickle", "truncated", "wrong_sizes"])
def test_a_damaged_rank_state_is_one_error(tmp_path, damage):
    path = tmp_path / "r.safetensors"
    state = rng_state()
    if damage == "wrong_sizes":
        state = {**state, "numpy": (state["numpy"][0], state["numpy"][1][:10], *state["numpy"][2:])}
    save_rank_state(path, {"position": 1}, state)
    if damage == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is not a gptscale rank state"):
        load_rank_state(path)
