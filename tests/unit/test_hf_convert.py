"""gptscale <-> Hugging Face transformers: exported models compute gptscale's logits, the
weight maps are bitwise inverses, and what cannot be converted exactly is refused.

Tiny random models only; everything offline.
"""
import dataclasses
import json

import pytest
import torch

from gptscale.checkpoint.weights import canonical_state_dict
from gptscale.config import ModelConfig
from gptscale.convert.hf import (from_hf, hf_config, hf_config_to_model_config, hf_names, hf_shapes,
                                 tensor_from_hf, tensor_to_hf, to_hf)
from gptscale.errors import CheckpointError, ConfigError
from gptscale.model.gpt import GPT

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

BASE = dict(block_size=16, n_layer=2, n_embd=32, init_std=0.1)
SHAPES = {  # vocabularies are no multiple of the padding (64): padding must be removed
    "llama-gqa-untied": dict(family="llama", vocab_size=250, n_head=4, n_kv_head=2, rope_theta=500.0),
    "llama-mqa-tied-bias": dict(family="llama", vocab_size=1003, n_head=4, n_kv_head=1, tie_embeddings=True,
                                bias=True, ffn_hidden=40),
    "llama-mha-bias": dict(family="llama", vocab_size=250, n_head=2, n_kv_head=2, bias=True),
    "gpt2-tied": dict(family="gpt2", vocab_size=250, n_head=4),
    "gpt2-untied": dict(family="gpt2", vocab_size=1003, n_head=2, tie_embeddings=False, ffn_hidden=48),
    "gpt2-nobias": dict(family="gpt2", vocab_size=250, n_head=4, bias=False, norm_eps=1e-6),
}


@pytest.fixture(autouse=True)
def _few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def make_cfg(shape: str) -> ModelConfig:
    return ModelConfig(**BASE, **SHAPES[shape])


def random_gpt(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Random weights, with norms and biases moved off their 1 / 0 init so they matter."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def hf_model(config: dict):
    """A random HF model for a config.json dict, as from_pretrained would build it."""
    config = dict(config)
    hf_cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    return transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()


def load_exported(model: GPT):
    """An HF model holding `model`'s weights through to_hf; checks that exactly the tied
    lm_head (if any) was left to HF."""
    hf = hf_model(hf_config(model.cfg, bos_token_id=0, eos_token_id=1))
    result = hf.load_state_dict(to_hf(canonical_state_dict(model), model.cfg), strict=False)
    assert result.missing_keys == (["lm_head.weight"] if model.cfg.tie_embeddings else [])
    assert result.unexpected_keys == []
    if model.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    return hf


def max_diff(model: GPT, hf, ids: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model.full_logits(model(ids))
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape == (*ids.shape, model.cfg.vocab_size)
    return (ours - theirs).abs().max().item()


def rmsnorm_keeping_dtype(self, x):
    """HF's LlamaRMSNorm with its fp32 rounding left out (it casts to fp32 even in fp64)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


# -- logits parity ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_exported_model_computes_gptscale_logits(shape, monkeypatch):
    model = random_gpt(make_cfg(shape))
    hf = load_exported(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.block_size))
    assert max_diff(model, hf, ids) <= 1e-4  # fp32

    model.double(), hf.double()
    if model.cfg.family == "llama":
        # HF's RMSNorm rounds to fp32 whatever the dtype; without that, conversion must be exact.
        assert max_diff(model, hf, ids) <= 1e-5
        monkeypatch.setattr(transformers.models.llama.modeling_llama.LlamaRMSNorm, "forward",
                            rmsnorm_keeping_dtype)
    assert max_diff(model, hf, ids) <= 1e-9


@pytest.mark.parametrize("shape", ["llama-gqa-untied", "gpt2-tied"])
def test_config_and_safetensors_load_with_from_pretrained(shape, tmp_path):
    model = random_gpt(make_cfg(shape))
    hf_weights = to_hf(canonical_state_dict(model), model.cfg)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.cfg, 0, 1), indent=2))
    safetensors_torch.save_file(hf_weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                local_files_only=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    loaded = hf.state_dict()
    for name, tensor in hf_weights.items():
        assert torch.equal(loaded[name], tensor), name
    if model.cfg.family == "llama":
        assert hf.config.rope_parameters["rope_theta"] == model.cfg.rope_theta
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert max_diff(model, hf.eval(), ids) <= 1e-4


# -- bitwise inverses ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_from_hf_inverts_to_hf(shape):
    cfg = make_cfg(shape)
    canonical = canonical_state_dict(random_gpt(cfg))
    assert_bitwise_equal(from_hf(to_hf(canonical, cfg), cfg), canonical)


@pytest.mark.parametrize("model_type, fields", [
    ("gpt2", dict(vocab_size=250, n_positions=16, n_embd=32, n_layer=2, n_head=4)),
    ("gpt2", dict(vocab_size=1003, n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=40,
                  tie_word_embeddings=False, activation_function="gelu_pytorch_tanh")),
    ("llama", dict(vocab_size=250, max_position_embeddings=16, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    ("llama", dict(vocab_size=1003, max_position_embeddings=16, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                   attention_bias=True, mlp_bias=True, rope_theta=1e6)),
])
def test_to_hf_inverts_from_hf_for_an_hf_initialized_model(model_type, fields):
    hf_cfg = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cfg = hf_config_to_model_config(hf_cfg.to_dict())
    assert hf_config_to_model_config(hf_cfg.to_diff_dict()) == cfg  # class defaults left out

    state = hf.state_dict()
    back = to_hf(from_hf(state, cfg), cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # the tied copy: from_pretrained ties it again
    assert_bitwise_equal(back, state)
    assert back.keys() == hf_shapes(cfg).keys()


def test_streaming_one_tensor_at_a_time_matches_the_dicts():
    cfg = make_cfg("llama-gqa-untied")
    canonical = canonical_state_dict(random_gpt(cfg))
    hf_state = to_hf(canonical, cfg)
    for name, targets in hf_names(cfg).items():
        one = tensor_to_hf(name, canonical[name], cfg)
        assert tuple(one) == targets
        assert_bitwise_equal(one, {t: hf_state[t] for t in targets})
        assert torch.equal(tensor_from_hf(name, one, cfg), canonical[name])
    assert hf_names(cfg)["blocks.0.attn.qkv.weight"] == tuple(
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")


def test_bias_free_gpt2_needs_zero_hf_biases():
    cfg = make_cfg("gpt2-nobias")
    hf_state = to_hf(canonical_state_dict(random_gpt(cfg)), cfg)
    assert not hf_state["transformer.h.0.attn.c_attn.bias"].any()
    hf_state["transformer.h.0.attn.c_attn.bias"][3] = 1.0
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.bias is not zero"):
        from_hf(hf_state, cfg)


def test_from_hf_accepts_a_bare_base_model_checkpoint():
    """GPT-2 as published: GPT2Model keys (no transformer. prefix) plus causal-mask buffers."""
    cfg = make_cfg("gpt2-tied")
    canonical = canonical_state_dict(random_gpt(cfg))
    bare = {k.removeprefix("transformer."): v for k, v in to_hf(canonical, cfg).items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 16, 16)
    assert_bitwise_equal(from_hf(bare, cfg), canonical)


def test_from_hf_refuses_an_untied_head_for_a_tied_model():
    cfg = make_cfg("gpt2-tied")
    hf_state = to_hf(canonical_state_dict(random_gpt(cfg)), cfg)
    hf_state["lm_head.weight"] = torch.randn_like(hf_state["transformer.wte.weight"])
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        from_hf(hf_state, cfg)


# -- configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_hf_config_round_trips_the_model_config(shape):
    cfg = make_cfg(shape)
    back = hf_config_to_model_config(hf_config(cfg, None, None))
    if cfg.family == "gpt2":
        assert back.bias  # HF GPT-2 always has biases; a bias-free model exports zeros
        back = dataclasses.replace(back, bias=cfg.bias)
    assert back == cfg


def one_line_error(error: type, call, *fragments: str) -> None:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("hf_cfg, fragments", [
    (dict(model_type="mistral"), ["model_type='mistral'"]),
    (dict(model_type="opt"), ["model_type='opt'"]),
    (dict(model_type="gpt2", activation_function="gelu"), ["activation_function='gelu'", "tanh"]),
    (dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx=True"]),
    (dict(model_type="llama", rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0)),
     ["rope_type='llama3'"]),
    (dict(model_type="llama", rope_scaling=dict(type="linear", factor=2.0)), ["rope_type='linear'"]),
    (dict(model_type="llama", attention_bias=True, mlp_bias=False), ["mlp_bias=False"]),
    (dict(model_type="llama", head_dim=64, hidden_size=256, num_attention_heads=8), ["head_dim=64"]),
    (dict(model_type="llama", hidden_act="gelu"), ["hidden_act='gelu'"]),
])
def test_hf_configs_gptscale_cannot_compute_exactly_are_refused(hf_cfg, fragments):
    one_line_error(ConfigError, lambda: hf_config_to_model_config(hf_cfg), *fragments)


def test_gpt2_with_grouped_query_attention_is_refused():
    cfg = ModelConfig(family="gpt2", vocab_size=250, block_size=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)
    one_line_error(ConfigError, lambda: hf_config(cfg, None, None), "model.n_kv_head=2", "grouped-query")
    one_line_error(ConfigError, lambda: to_hf(canonical_state_dict(GPT(cfg)), cfg), "model.n_kv_head=2")


def test_token_ids_outside_the_vocabulary_are_refused():
    one_line_error(ConfigError, lambda: hf_config(make_cfg("gpt2-tied"), 50256, 1), "bos_token_id=50256")
