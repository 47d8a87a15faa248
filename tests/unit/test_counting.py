"""The parameter-count formula equals the instantiated model, preset by preset."""
import pytest
import torch

from gptscale.config import ModelConfig
from gptscale.model.counting import count_parameters, flops_per_token, parameters_per_tp_rank
from gptscale.model.gpt import GPT
from gptscale.parallel.topology import TPGroup
from gptscale.presets import preset_names

# Numbers published by the models' authors (total parameters, tied where the model ties).
PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "gpt2-350m": 354_823_168,
    "llama-1b": 1_235_814_400,
    "llama-7b": 6_738_415_616,
    "llama-70b": 68_976_648_192,
    "llama-405b": 405_853_388_800,
}


@pytest.mark.parametrize("name", preset_names())
def test_count_equals_instantiated_model(name):
    # The meta device instantiates even the 1T shape without allocating its weights.
    cfg = ModelConfig.from_preset(name, vocab_pad_multiple=1)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_count_with_padded_vocab_and_real_weights(name):
    cfg = ModelConfig.from_preset(name, vocab_size=4000)
    model = GPT(cfg)  # instantiated for real: small enough
    padded = cfg.padded_vocab_size()
    assert padded == 4032
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg, padded).total


def test_published_counts():
    for name, expected in PUBLISHED.items():
        assert count_parameters(ModelConfig.from_preset(name)).total == expected, name


def test_flops_per_token_matches_6n_plus_attention():
    cfg = ModelConfig.from_preset("gpt2-124m")
    counts = count_parameters(cfg)
    # Tied model: positions cost nothing, the embedding matrix counts once (as the head).
    assert counts.matmul == counts.total - counts.positional
    assert flops_per_token(cfg, 1024) == 6 * counts.matmul + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("name, tp", [("tiny", 1), ("tiny", 4), ("tiny-llama", 2), ("gpt2-124m", 4),
                                      ("llama-1b", 8), ("llama-70b", 8)])
def test_per_tp_rank_count_equals_one_rank_s_shard(name, tp):
    """`gptscale info` answers by arithmetic (a shape with 10,000 layers took 16 s to build on meta)."""
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        shard = GPT(cfg, TPGroup.shape_only(tp))
    assert sum(p.numel() for p in shard.parameters()) == parameters_per_tp_rank(cfg, tp)
