"""pipe_zero3 (ZeRO-3 inside pipeline stages, gptscale's 1F1B) on 4 gloo CPU ranks: losses
equal the single-process model's, checkpoints consolidate and resume exactly; GPT-2's tied
embedding, copied on the first and last stage, trains as the dense model's one matrix."""
import functools

import pytest
import torch

from gptscale import config
from gptscale.testing.distributed import run_ranks
from tests.parallel.training import (ENV, SMALL_GPT2_4_BLOCKS, SMALL_LLAMA, assert_weights_match, check_exact_resume,
                                     dense_reference, synthetic, train_layouts)

pytestmark = pytest.mark.dist

PIPE_ZERO3 = ["parallel.mode=pipe_zero3", "parallel.pp=2", "train.lr=3e-3"]
LAYOUTS = {  # the same global batch: 2 micro-steps of dp x micro_batch = 4 rows
    "pp2_dp2": [*PIPE_ZERO3, "train.micro_batch=2"],
    "pp2_dp2_gather_per_step": [*PIPE_ZERO3, "train.micro_batch=2", "parallel.pipe_zero3_gather=step"],
    "pp2_tp2": [*PIPE_ZERO3, "parallel.tp=2", "train.micro_batch=4"],
    # Decay read from the whole shape of parameters ZeRO-3 partitioned as they were built.
    "pp2_dp2_weight_decay": [*PIPE_ZERO3, "train.micro_batch=2", "train.weight_decay=2.0"],
    # Interleaved 1F1B: 2 chunks of 1 block per stage (stage 0: embedding + block 0, block 2).
    "pp2_dp2_interleaved": [*PIPE_ZERO3, "train.micro_batch=2", "parallel.virtual_stages=2"],
}


# GPT-2 (tied embedding), clipped: the dense gradient norm is 1.48 at the first step, so a tied
# gradient counted twice in the norm would change every update.
TIED = {
    "gpt2_pp2_dp2": [*PIPE_ZERO3, "train.micro_batch=2", "train.grad_clip=0.3"],
    # Interleaved: the embedding in stage 0's first chunk, the head in stage 1's last.
    "gpt2_pp2_dp2_interleaved": [*PIPE_ZERO3, "train.micro_batch=2", "train.grad_clip=0.3",
                                 "parallel.virtual_stages=2"],
    "gpt2_pp4": ["parallel.mode=pipe_zero3", "parallel.pp=4", "train.lr=3e-3", "train.micro_batch=4",
                 "train.grad_clip=0.3"],
}
# Built from each stage's own seed (no train.init_from): the last stage's copy starts as the first's.
OWN_INIT = ("gpt2_pp2_dp2_own_init", [*PIPE_ZERO3, "train.micro_batch=2", "train.steps=2"])


def test_pipe_zero3_equals_dense(tmp_path, init_weights_llama, init_weights_4_blocks):
    """The Llama layouts, then GPT-2's tied ones, train one after another in the same 4 ranks
    (one start-up: the first engine's build costs more than a run)."""
    from gptscale.checkpoint.convert import consolidate

    runs = {layout: synthetic(tmp_path, layout, f"train.init_from={init_weights_llama}", *LAYOUTS[layout],
                              model=SMALL_LLAMA) for layout in sorted(LAYOUTS)}
    own_init, extra = OWN_INIT
    # PP=4 last: ZeRO-3 numbers modules per process, and its order check compares the numbers
    # of a stage's DP ranks, which runs with other stage cuts before would have set apart.
    tied = {own_init: synthetic(tmp_path, own_init, *extra, model=SMALL_GPT2_4_BLOCKS),
            **{layout: synthetic(tmp_path, layout, f"train.init_from={init_weights_4_blocks}", *TIED[layout],
                                 model=SMALL_GPT2_4_BLOCKS) for layout in TIED}}
    results = run_ranks(_train_both, 4, list(runs.values()), list(tied.values()), timeout=400, env=ENV)
    for index, (layout, overrides) in enumerate(runs.items()):
        losses = [rank_results[0][index]["losses"] for rank_results in results]
        reference, dense_final = _dense_reference(_dense_key(overrides), init_weights_llama)
        assert all(run == losses[0] for run in losses)
        worst = max(abs(losses[0][s] - reference[s]) for s in range(1, 6))
        print(f"{layout}: max |pipe_zero3 - dense| loss over 5 steps: {worst:.2e}")
        assert worst < 1e-4, (layout, losses[0], reference)
        assert reference[5] < reference[1] - 0.02
        _, weights = consolidate(tmp_path / layout / "checkpoints" / "step00000005")
        assert_weights_match(weights, dense_final, overrides, loss_tol=1e-4)
    for index, (layout, overrides) in enumerate(tied.items()):
        ranks = [rank_results[1][index] for rank_results in results]
        if layout in TIED:
            _check_tied(tmp_path, layout, overrides, ranks, init_weights_4_blocks)
        else:
            _check_copies_equal(tmp_path / layout / "checkpoints" / "step00000002", ranks)


def _dense_key(overrides) -> tuple[str, ...]:
    """What the dense reference depends on: not the layout, the run folder or the micro-batch
    (it takes dp x micro_batch = 4 rows per micro-step, as every layout here)."""
    return tuple(o for o in overrides if not o.startswith(("parallel.", "train.out_dir=", "train.micro_batch=")))


@functools.lru_cache(maxsize=None)
def _dense_reference(key, init_path):
    return dense_reference(list(key), init_path, 5)


def _train_both(runs, tied_runs):
    return train_layouts(runs), _train_tied(tied_runs)


def _train_tied(runs):
    """Rank body: train each run; report the losses, the first step's gradients (whole over
    DP, canonical names, before clipping) and norm, and this rank's copy of the tied embedding
    (numpy arrays: tensors would travel through shared memory that ends with the rank)."""
    from deepspeed.utils import safe_get_local_fp32_param

    from gptscale.train.loop import Trainer

    out = []
    for overrides in runs:
        trainer = Trainer(config.load(None, overrides), "none")
        runtime = trainer.runtime
        first, norms = _record_first_gradients_and_norms(runtime)
        result = trainer.run()
        tied = {}
        if runtime.tied:
            (_, module), = runtime.tied.values()
            weight = module.embed.weight
            with runtime.ctx.deepspeed.zero.GatheredParameters([weight]):
                tied = {"whole": _array(weight), "master": _array(safe_get_local_fp32_param(weight))}
        out.append({"losses": result.losses, "grads": first, "norm": norms[0], "tied": tied, "stage": runtime.stage,
                    "dp": runtime.topo.coords.dp})
    return out


def _record_first_gradients_and_norms(runtime):
    """({canonical name: gradient} at the first boundary step, filled then; [each step's norm])."""
    from deepspeed.utils import safe_get_full_grad

    params, optimizer, first, norms = runtime.canonical_parameters(), runtime.engine.optimizer, {}, []
    step, train_step = optimizer.step, runtime.train_step

    def step_recording_first(*args, **kwargs):
        if not first:  # a collective over the stage's DP group: every rank records
            first.update({name: _array(safe_get_full_grad(p)) for name, p in sorted(params.items())})
        return step(*args, **kwargs)

    def train_step_recording_norm(*args):
        loss = train_step(*args)
        norms.append(runtime.grad_norm())
        return loss

    optimizer.step, runtime.train_step = step_recording_first, train_step_recording_norm
    return first, norms


def _array(tensor):
    return tensor.detach().numpy().copy()


@functools.lru_cache(maxsize=None)
def _dense_first_step(key, init_path, rows_per_micro_step=4):
    """The dense model's gradient of every parameter at the first step, and their norm."""
    from safetensors.torch import load_file

    from gptscale.convert.tp import split_tp
    from gptscale.model.gpt import GPT
    from gptscale.parallel.layers import split_table
    from gptscale.train.batches import SyntheticBatches

    cfg = config.load(None, list(key))
    model = GPT(cfg.model)
    model.load_state_dict(split_tp(load_file(str(init_path)), split_table(model), 1, model.padded_vocab)[0])
    batch = SyntheticBatches(cfg.model.vocab_size, cfg.data.seq_len, rows_per_micro_step, cfg.train.grad_accum, 0, 1,
                             cfg.data.seed).global_batch(0)
    for micro in range(cfg.train.grad_accum):
        rows = batch[micro * rows_per_micro_step:(micro + 1) * rows_per_micro_step]
        (model(rows[:, :-1], labels=rows[:, 1:]) / cfg.train.grad_accum).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return grads, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()


def _check_tied(tmp_path, layout, overrides, ranks, init_path):
    """GPT-2 at PP=2 x DP=2 or PP=4: the tied embedding's two copies each hold the dense gradient
    (embedding use + head use), count once in the clipped norm, stay bitwise equal and
    consolidate to one matrix."""
    reference, dense_final = _dense_reference(_dense_key(overrides), init_path)
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    worst = max(abs(ranks[0]["losses"][s] - reference[s]) for s in range(1, 6))
    dense_grads, dense_norm = _dense_first_step(_dense_key(overrides), init_path)
    grads = {name: torch.from_numpy(g) for r in ranks if r["dp"] == 0 for name, g in r["grads"].items()}
    assert grads.keys() == dense_grads.keys()
    grad_error = max((grads[n] - dense_grads[n]).abs().max().item() for n in grads)
    copies = [r["grads"]["embed.weight"] for r in ranks if r["dp"] == 0 and r["tied"]]  # each stage's own
    assert len(copies) == 2 and (copies[0] == copies[1]).all()
    print(f"{layout}: max |pipe_zero3 - dense| loss over 5 steps {worst:.2e}, first-step gradients {grad_error:.2e}, "
          f"gradient norm {ranks[0]['norm']:.7f} (dense {dense_norm:.7f})")
    assert worst < 1e-5, (layout, ranks[0]["losses"], reference)
    assert grad_error < 1e-5 and dense_norm > 0.3  # and the clipping clipped
    assert all(abs(r["norm"] - dense_norm) < 1e-5 * dense_norm for r in ranks), (dense_norm, ranks)
    weights = _check_copies_equal(tmp_path / layout / "checkpoints" / "step00000005", ranks)
    assert_weights_match(weights, dense_final, overrides, loss_tol=1e-4)


def _check_copies_equal(checkpoint, ranks):
    """The two copies of the tied embedding (on the first and last stage, same DP rank) are
    bitwise equal, and the checkpoint consolidates to that one matrix; returns its weights."""
    from gptscale.checkpoint.convert import consolidate

    last = max(r["stage"] for r in ranks)
    for first_copy in (r for r in ranks if r["stage"] == 0):
        twin = next(r for r in ranks if r["stage"] == last and r["dp"] == first_copy["dp"])
        for kind in ("whole", "master"):
            assert torch.equal(torch.from_numpy(first_copy["tied"][kind]), torch.from_numpy(twin["tied"][kind]))
    _, weights = consolidate(checkpoint)
    embed = weights["embed.weight"]
    assert torch.equal(embed, torch.from_numpy(first_copy["tied"]["whole"])[:len(embed)])  # once, as trained
    return weights


def test_pipe_zero3_resumes_exactly(tmp_path, shards):
    # PP=2 x DP=1: the resume logic is per stage, and two ranks keep the suite short.
    full = check_exact_resume(tmp_path, shards, 2, *PIPE_ZERO3, "model.tie_embeddings=false", "model.n_layer=4",
                              "train.grad_accum=2", "train.micro_batch=4", "data.num_workers=0", "train.lr=3e-3",
                              "train.eval_every=3", sigterm=False)
    assert set(full["val"]) == {0, 3, 6} and full["val"][6] < full["val"][0]  # validation through the stages
    assert full["sample"] and full["sample"].startswith("def ")  # generated from the pipe_zero3 checkpoint


def _check_in_groups(mismatch):
    """Ranks {0, 1} and {2, 3} run the check in their own group; the other group never joins."""
    import torch.distributed as dist

    from gptscale.runtime.pipe_zero3 import ds_internals

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = dist.get_rank()
    ds_internals._group = groups[rank // 2]
    if rank < 2:
        ints = [7, 8, 9] if not (mismatch and rank == 1) else [7, 9, 8]
        try:
            ds_internals.assert_ints_same_in_group(ints)
        except RuntimeError as err:
            return str(err)
    return "ok"


def test_the_consistency_check_runs_within_its_group():
    assert run_ranks(_check_in_groups, 4, False, timeout=60) == ["ok"] * 4
    result = run_ranks(_check_in_groups, 4, True, timeout=60)
    assert result[0] == "ok" and "disagree on parameter order" in result[1] and result[2:] == ["ok", "ok"]
