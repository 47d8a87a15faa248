"""Resume anywhere: a run saved at zero3 TP=2 x DP=2 continues at another mode and layout
(weights, Adam's moments and step, schedule and data position carry over) with the losses
the unconverted run has; so do one saved at pipe PP=2 x DP=2 continuing at zero3 and a fresh
run from the checkpoint consolidated with its optimizer state (bf16 weights, fp32 masters)."""
import pytest

from gptscale.testing.distributed import run_ranks
from tests.parallel.training import ENV, SMALL_LLAMA, save_init_weights, synthetic, train_in_turn

pytestmark = pytest.mark.dist

# Grouped-query attention, untied head, vocabulary 515: padded to 640 rows at TP=2 and 576 at
# TP=1, so the moments of the padded rows must be dropped and re-added, not shifted.
MODEL = [*SMALL_LLAMA, "model.vocab_size=515"]
SAVED, MORE = 5, 5


def config(tmp_path, name, steps, *extra):
    # Global batch 8 rows in every layout (micro_batch x DP x grad_accum), a schedule still
    # warming up at the save (warmup 6), and weight decay: each piece of state matters.
    return synthetic(tmp_path, name, f"train.steps={steps}", "train.warmup_steps=6", "train.weight_decay=0.1",
                     *extra, model=MODEL)


def test_a_zero3_run_continues_at_pipe_pipe_zero3_and_one_rank_with_the_same_losses(tmp_path):
    ckpt = tmp_path / "saved" / "checkpoints" / f"step{SAVED:08d}"
    pipe_ckpt = tmp_path / "pipe_saved" / "checkpoints" / f"step{SAVED:08d}"
    start = f"train.init_from={save_init_weights(tmp_path / 'init.safetensors', MODEL)}"
    total = SAVED + MORE
    four = [(config(tmp_path, "saved", SAVED, "parallel.tp=2", start), "none"),
            (config(tmp_path, "saved", total, "parallel.tp=2"), "auto"),  # the unconverted continuation
            (config(tmp_path, "pipe", total, "parallel.pp=2"), str(ckpt)),
            (config(tmp_path, "pipe_zero3", total, "parallel.pp=2", "parallel.mode=pipe_zero3",
                    "train.ds_config=zero3"), str(ckpt)),
            # The other way: saved by the PipelineEngine (ZeRO-1 optimizer files), continued at zero3.
            (config(tmp_path, "pipe_saved", SAVED, "parallel.pp=2", start), "none"),
            (config(tmp_path, "from_pipe", total, "parallel.tp=2"), str(pipe_ckpt))]
    saved, same, pipe, pipe_zero3, pipe_saved, from_pipe = run_ranks(train_in_turn, 4, four, timeout=500, env=ENV)[0]
    # Consolidated with its optimizer state, the checkpoint is a canonical folder that a fresh
    # run continues from through train.init_from.
    from gptscale.checkpoint.canonical import write_canonical
    from gptscale.checkpoint.read import CheckpointReader

    reader = CheckpointReader(ckpt)
    canon = write_canonical(reader, tmp_path / "canonical", "bf16", True, reader.trainer_state())
    one = [(config(tmp_path, "one", total, "train.micro_batch=4"), str(ckpt)),
           (config(tmp_path, "one_canonical", total, "train.micro_batch=4", f"train.init_from={canon}"), "none"),
           (config(tmp_path, "weights_only", MORE, "train.micro_batch=4", f"train.init_from={ckpt}"), "none")]
    single, from_canonical, weights_only = run_ranks(train_in_turn, 1, one, timeout=300, env=ENV)[0]
    assert sorted(same["losses"]) == list(range(SAVED + 1, total + 1))
    assert max(abs(pipe_saved["losses"][s] - saved["losses"][s]) for s in saved["losses"]) < 1e-4
    for name, run in (("pipe", pipe), ("pipe_zero3", pipe_zero3), ("tp1 dp1", single), ("from pipe", from_pipe),
                      ("canonical bf16 + fp32 masters", from_canonical)):
        assert sorted(run["losses"]) == sorted(same["losses"]), (name, run["losses"])
        diffs = [abs(run["losses"][s] - same["losses"][s]) for s in same["losses"]]
        assert max(diffs) < 1e-4, (name, run["losses"], same["losses"])
    # The comparison has teeth: the same weights without the rest of the state (fresh Adam,
    # schedule from step 0) continue with other losses.
    fresh = [abs(weights_only["losses"][s - SAVED] - same["losses"][s]) for s in same["losses"]]
    assert max(fresh) > 1e-3, (weights_only["losses"], same["losses"])
    assert saved["steps"] == SAVED
