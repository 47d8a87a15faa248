"""Sequence parallelism (parallel.sequence_parallel) in every run mode on 4 gloo CPU ranks:
losses equal the single-process run from the same weights and batches, checkpoints
consolidate to its weights. (The model-level check, every gradient against the dense model, is in
test_tensor_parallel.py; the bytes a step sends, in test_comm_volume.py.)"""
import pytest

from gptscale.testing.distributed import run_ranks
from tests.parallel.training import (ENV, SMALL_GPT2_4_BLOCKS, SMALL_LLAMA, assert_weights_match, dense_reference,
                                     synthetic, train_layouts)

pytestmark = pytest.mark.dist

SP = ["parallel.sequence_parallel=true", "train.lr=3e-3"]
# Each the same global batch as the dense reference: 2 micro-steps of dp x micro_batch = 4 rows.
LAYOUTS = {
    "zero3_tp2_dp2_llama": (SMALL_LLAMA, [*SP, "parallel.tp=2", "train.micro_batch=2"]),
    "zero3_tp4_gpt2": (SMALL_GPT2_4_BLOCKS, [*SP, "parallel.tp=4", "train.micro_batch=4"]),
    "pipe_tp2_pp2_gpt2": (SMALL_GPT2_4_BLOCKS, [*SP, "parallel.tp=2", "parallel.pp=2", "train.micro_batch=4"]),
    "pipe_zero3_tp2_pp2_llama": (SMALL_LLAMA, [*SP, "parallel.mode=pipe_zero3", "parallel.tp=2", "parallel.pp=2",
                                               "train.micro_batch=4"]),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sp")
    from tests.parallel.training import save_init_weights

    weights = {id(SMALL_LLAMA): save_init_weights(tmp_path / "llama.safetensors", SMALL_LLAMA),
               id(SMALL_GPT2_4_BLOCKS): save_init_weights(tmp_path / "gpt2.safetensors", SMALL_GPT2_4_BLOCKS)}
    runs = {name: synthetic(tmp_path, name, f"train.init_from={weights[id(model)]}", *extra, model=model)
            for name, (model, extra) in LAYOUTS.items()}
    results = run_ranks(train_layouts, 4, list(runs.values()), timeout=500, env=ENV)
    return tmp_path, runs, weights, results


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sequence_parallel_equals_dense(trained, layout):
    tmp_path, runs, weights, results = trained
    index = list(runs).index(layout)
    overrides = runs[layout]
    losses = [rank_results[index]["losses"] for rank_results in results]
    model = LAYOUTS[layout][0]
    reference, dense_final = dense_reference(overrides, weights[id(model)], 5)
    assert all(run == losses[0] for run in losses), losses
    worst = max(abs(losses[0][s] - reference[s]) for s in range(1, 6))
    print(f"{layout}: max |sequence parallel - dense| loss over 5 steps: {worst:.2e}")
    assert worst < 1e-5, (layout, losses[0], reference)
    assert reference[5] < reference[1] - 0.02  # it learns: the comparison is not between constants

    from gptscale.checkpoint.convert import consolidate

    _, weights_after = consolidate(tmp_path / layout / "checkpoints" / "step00000005")
    assert_weights_match(weights_after, dense_final, overrides, loss_tol=1e-5)
