"""Communication accounting as a test: the bytes every rank sends in one training step, counted
at every torch.distributed call (gptscale.testing.comm), against what
`scaling.comm_volume.step_bytes` predicts from the run config: zero3 (TP x ZeRO-3 DP, with and
without sequence parallelism) and pipe (DeepSpeed's PipelineEngine: DP and TP x PP), 4 gloo
ranks, one spawn. A regression that sends more (a second gather, an all-reduce too many)
fails it: measured / theory must be within [1, 1.05]."""
import json

import pytest

from gptscale import config
from gptscale.scaling.comm_volume import step_bytes
from gptscale.testing.distributed import run_ranks
from tests.parallel.training import ENV, SMALL_LLAMA, synthetic

pytestmark = pytest.mark.dist


def _count(runs):
    from gptscale.testing.comm import count_step_communication

    return [count_step_communication(overrides, step=2) for overrides in runs]


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("comm")
    template = tmp_path / "zero3_all_partitioned.json"  # every parameter gathered and reduce-scattered
    template.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                    "steps_per_print": 10 ** 9}))
    zero3 = ["parallel.tp=2", "train.micro_batch=2", f"train.ds_config={template}"]
    runs = {
        "zero3 tp2 dp2": [*zero3],
        "zero3 tp2 dp2 sequence parallel": [*zero3, "parallel.sequence_parallel=true"],
        "pipe pp2 dp2": ["parallel.pp=2", "train.micro_batch=2"],
        "pipe tp2 pp2": ["parallel.pp=2", "parallel.tp=2", "train.micro_batch=4"],
    }
    overrides = {name: synthetic(tmp_path, name.replace(" ", "_"), *extra, "train.steps=3", model=SMALL_LLAMA)
                 for name, extra in runs.items()}
    results = run_ranks(_count, 4, list(overrides.values()), timeout=400, env=ENV)
    return overrides, results


@pytest.mark.parametrize("run", ["zero3 tp2 dp2", "zero3 tp2 dp2 sequence parallel", "pipe pp2 dp2", "pipe tp2 pp2"])
def test_a_step_sends_what_the_theory_says(counted, run):
    overrides, results = counted
    index = list(overrides).index(run)
    cfg = config.load(None, overrides[run])
    for rank, rank_results in enumerate(results):
        measured = rank_results[index]
        dp = 4 // (cfg.parallel.tp * cfg.parallel.pp)
        theory = step_bytes(cfg, dp, measured["stage"])
        for group in ("tp", "dp", "p2p", "p2p_gather"):
            got, want = measured[group], theory[group]
            print(f"{run} rank {rank} {group}: measured {got:,.0f} B, theory {want:,.0f} B"
                  + (f" ({got / want:.4f})" if want else ""))
            if want == 0:
                assert got < 64, (run, rank, group, got)  # a few scalars at most
            else:
                assert 1.0 <= got / want <= 1.05, (run, rank, group, got, want)


def test_sequence_parallel_sends_the_bytes_of_the_all_reduces_it_replaces(counted):
    """Per layer, TP's all-reduces become as many reduce-scatter + all-gather pairs: the same
    bytes in a ring. Added: the replicated parameters' gradients, all-reduced over the group."""
    overrides, results = counted
    names = list(overrides)
    for rank_results in results:
        plain = rank_results[names.index("zero3 tp2 dp2")]
        sequence = rank_results[names.index("zero3 tp2 dp2 sequence parallel")]
        assert plain["tp_kinds"] == ["all_reduce"]
        assert sequence["tp_kinds"] == ["all_gather", "all_reduce", "reduce_scatter"]
        assert sequence["tp_activation"] == pytest.approx(plain["tp_activation"], rel=1e-9)
        print(f"TP bytes per step: all-reduce {plain['tp']:,.0f}, sequence parallel {sequence['tp']:,.0f} "
              f"({sequence['tp'] / plain['tp']:.4f}x)")
        assert 1.0 < sequence["tp"] / plain["tp"] <= 1.02
