"""Config loading: strict keys, typed values, one clear error per bad input."""
import pytest

from gptscale import config
from gptscale.config import ModelConfig, ParallelConfig, RunConfig
from gptscale.errors import ConfigError
from gptscale.presets import preset_names


def test_family_defaults_are_resolved():
    gpt2 = ModelConfig(family="gpt2", n_embd=64, n_head=4)
    assert (gpt2.bias, gpt2.tie_embeddings, gpt2.n_kv_head, gpt2.ffn_hidden) == (True, True, 4, 256)
    llama = ModelConfig(family="llama", n_embd=4096, n_head=32)
    assert (llama.bias, llama.tie_embeddings, llama.ffn_hidden) == (False, False, 11008)


def test_load_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny-llama\n  n_layer: 3\nparallel:\n  tp: 2\n")
    cfg = config.load(path, ["model.dropout=0.1", "parallel.pp=1"])
    assert cfg.model.family == "llama" and cfg.model.n_layer == 3 and cfg.model.n_kv_head == 4
    assert cfg.model.dropout == 0.1 and cfg.parallel.tp == 2
    assert isinstance(cfg.to_dict()["model"]["dropout"], float)


@pytest.mark.parametrize("overrides, message", [
    (["model.n_heads=4"], "unknown config key 'model.n_heads'; did you mean 'n_head'?"),
    (["modle.n_head=4"], "unknown config key 'modle'; did you mean 'model'?"),
    (["model.n_head=-4"], "model.n_head=-4 must be >= 1"),
    (["model.n_layer=0"], "model.n_layer=0 must be >= 1"),
    (["model.n_head=5"], "model.n_embd=768 is not divisible by model.n_head=5"),
    (["model.n_kv_head=5"], "model.n_kv_head=5 does not divide model.n_head=12"),
    (["parallel.tp=8"], "model.n_head=12 is not divisible by parallel.tp=8"),
    (["model.n_layer=two"], "model.n_layer='two' has type str; expected int"),
    (["model.bias=1"], "model.bias=1 has type int; expected bool or null"),
    (["model.family=gpt3"], "model.family='gpt3' is unknown"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["parallel.dp=0"], "parallel.dp=0 must be >= 1"),
    (["model.preset=gpt5"], "model.preset='gpt5' is unknown"),
    (["model"], "override 'model' is not of the form section.key=value"),
    (["model.n_layer=2", "parallel.pp=3"], "parallel.pp=3 exceeds model.n_layer=2: every pipeline stage needs"),
    (["parallel.pp=2", "parallel.mode=zero3"], "parallel.mode=zero3 cannot use parallel.pp=2"),
    (["parallel.mode=pipeline"], "parallel.mode='pipeline' is unknown; choose one of auto, zero3, pipe"),
    (["parallel.pipe_partition=type"], "parallel.pipe_partition='type' is unknown"),
    (["parallel.pipe_zero3_gather=never"], "parallel.pipe_zero3_gather='never' is unknown"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["parallel.sequence_parallel=true", "parallel.tp=4", "data.synthetic=true", "data.seq_len=30"],
     "data.seq_len=30 is not divisible by parallel.tp=4, which parallel.sequence_parallel splits it over"),
    (["parallel.virtual_stages=2"], "parallel.virtual_stages=2 interleaves pipeline stages"),
    (["parallel.virtual_stages=2", "parallel.pp=2"], "only parallel.mode=pipe_zero3 runs: set that mode and "
                                                      "parallel.pp > 1"),
    (["parallel.virtual_stages=2", "parallel.pp=2", "parallel.mode=pipe_zero3", "model.n_layer=6"],
     "parallel.virtual_stages=2 does not divide the 3 blocks per stage (model.n_layer=6, parallel.pp=2)"),
    (["parallel.virtual_stages=2", "parallel.pp=2", "parallel.mode=pipe_zero3", "train.grad_accum=3"],
     "train.grad_accum=3 is not a multiple of parallel.pp=2"),
    (["model.activation_checkpointing=attention"], "model.activation_checkpointing='attention' is unknown; choose "
                                                   "one of none, selective, full"),
    (["model.compile=yes please"], "model.compile='yes please' has type str; expected bool"),
    (["model.compile=1"], "model.compile=1 has type int; expected bool"),
    (["model.compile=true", "parallel.mode=pipe_zero3", "parallel.pp=2"],
     "model.compile=true cannot be used with parallel.mode=pipe_zero3: its blocks are not ZeRO-3 leaf modules"),
    (["model.compile=true", "finetune.method=lora"],
     "model.compile=true cannot be used with finetune.method=lora under parallel.mode=zero3: ZeRO-3 LoRA"),
])
def test_bad_input_gets_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_kv_heads_must_split_across_tp():
    with pytest.raises(ConfigError, match=r"model.n_kv_head=4 is not divisible by parallel.tp=8"):
        RunConfig(model=ModelConfig.from_preset("tiny-llama", n_head=16), parallel=ParallelConfig(tp=8))


def test_world_size_mismatch_and_derived_dp():
    assert ParallelConfig(tp=2, pp=2).resolve_dp(8) == 2
    with pytest.raises(ConfigError, match=r"parallel.tp\*pp\*dp=2\*1\*3=6 does not equal the world size 4"):
        ParallelConfig(tp=2, dp=3).resolve_dp(4)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tp"):
        ParallelConfig(tp=4).resolve_dp(6)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(listy)


def test_every_preset_is_valid():
    for name in preset_names():
        assert ModelConfig.from_preset(name).n_layer >= 1


def test_mode_follows_pipeline_degree_unless_set():
    assert config.load(None, []).parallel.resolved_mode == "zero3"
    assert config.load(None, ["parallel.pp=2"]).parallel.resolved_mode == "pipe"
    assert config.load(None, ["parallel.mode=pipe"]).parallel.resolved_mode == "pipe"  # one stage is allowed
    assert config.load(None, ["parallel.mode=pipe_zero3", "parallel.pp=2"]  # GPT-2's tied embedding too
                       ).parallel.resolved_mode == "pipe_zero3"


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=.inf"], "train.lr=inf must be a finite number > 0"),
    (["train.lr=0"], "train.lr=0.0 must be a finite number > 0"),
    (["model.norm_eps=.nan"], "model.norm_eps=nan must be a finite number > 0"),
    (["train.grad_clip=-1"], "train.grad_clip=-1.0 must be a finite number >= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 must be a finite number >= 0"),
    (["train.eps=0"], "train.eps=0.0 must be a finite number > 0"),
    (["train.beta1=1.0"], "train.beta1=1.0 must be in [0, 1)"),
    (["train.beta2=-0.5"], "train.beta2=-0.5 must be in [0, 1)"),
    (["train.out_dir=''"], "train.out_dir is empty"),
    (["train.seed=-3"], "train.seed=-3 must be >= 0"),
    (["data.seed=-1"], "data.seed=-1 must be >= 0"),
    (["train.peak_tflops=0"], "train.peak_tflops=0.0 must be a finite number > 0"),
    (["train.sample_top_k=0"], "train.sample_top_k=0 must be >= 1"),
    (["model.n_layer=1000000000"], "model.n_layer=1000000000 is beyond what gptscale builds"),
    (["model.preset=[1]"], "model.preset=[1] must be a preset's name"),
    (["train.lr=["], "--set 'train.lr=[' is not valid YAML"),
    (["train.lr=*x"], "is not valid YAML"),
    (["train.lr={[1]: 2}"], "a key must be a plain value"),
])
def test_numbers_out_of_range_and_bad_yaml_in_overrides(overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, ["data.synthetic=true", *overrides])
    assert message in str(err.value)


def test_a_config_file_with_a_key_twice_or_aliases_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 3\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="key 'train' appears twice"):
        config.load(twice)
    # 342 bytes that safe_load expands to 9**9 strings (a 'billion laughs').
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases"):
        config.load(bomb)


def test_activation_checkpointing_reads_the_older_true_false_spelling():
    assert config.load(None, ["model.activation_checkpointing=true"]).model.activation_checkpointing == "full"
    assert config.load(None, ["model.activation_checkpointing=false"]).model.activation_checkpointing == "none"
    assert config.load(None, ["model.activation_checkpointing=selective"]).model.activation_checkpointing == "selective"
