"""gptscale LoRA adapters -> PEFT: an exported adapter folder, loaded by `peft.PeftModel` onto the
`to_hf` export of the base, computes the logits of gptscale's model with the adapter merged in;
inputs that do not fit are refused in one line.

Tiny random models only; everything offline.
"""
import json
import warnings

import pytest
import torch

from gptscale.checkpoint.weights import canonical_state_dict
from gptscale.config import ModelConfig
from gptscale.convert.hf import hf_config, to_hf
from gptscale.convert.peft import adapter_shapes, adapter_to_peft, merge_adapter, peft_target_modules
from gptscale.convert.tp import split_tp
from gptscale.errors import CheckpointError, ConfigError
from gptscale.model.gpt import GPT
from gptscale.parallel.layers import split_table
from tests.unit.test_hf_convert import _few_threads, one_line_error  # noqa: F401  (_few_threads: autouse)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

R, ALPHA = 4, 8
BASE = dict(block_size=16, n_layer=2, n_embd=32, init_std=0.1)
SHAPES = {  # every target each family has
    "gpt2-tied": (dict(family="gpt2", vocab_size=250, n_head=4), ["qkv", "proj", "up", "down"]),
    "llama-gqa-untied": (dict(family="llama", vocab_size=250, n_head=4, n_kv_head=2, rope_theta=500.0),
                         ["qkv", "proj", "up", "gate", "down", "head"]),
}


def make_cfg(shape: str) -> ModelConfig:
    return ModelConfig(**BASE, **SHAPES[shape][0])


def random_gpt(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def random_adapters(cfg: ModelConfig, targets, seed: int = 1) -> dict[str, torch.Tensor]:
    """A and B both random (B is zero at init, which would hide a wrong B)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.2 * torch.randn(shape, generator=gen) for name, shape in adapter_shapes(cfg, R, targets).items()}


def load_weights(cfg: ModelConfig, canonical: dict) -> GPT:
    model = GPT(cfg).eval()
    model.load_state_dict(split_tp(canonical, split_table(model), 1, model.padded_vocab)[0])
    return model


def hf_base(cfg: ModelConfig, canonical: dict):
    """The HF model of the exported base weights, built from its config.json."""
    config = hf_config(cfg, bos_token_id=0, eos_token_id=1)
    hf_cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    result = hf.load_state_dict(to_hf(canonical, cfg), strict=False)
    assert result.missing_keys == (["lm_head.weight"] if cfg.tie_embeddings else []) and not result.unexpected_keys
    return hf


def save_adapter(folder, tensors: dict, config: dict) -> None:
    folder.mkdir()
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_peft(hf, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(hf, str(folder))
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, GPT):
            return model.full_logits(model(ids))
        return model(ids).logits


def lora_modules(model) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


# -- logits parity ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_peft_adapter_computes_the_merged_gptscale_model(shape, tmp_path):
    cfg, targets = make_cfg(shape), SHAPES[shape][1]
    base = canonical_state_dict(random_gpt(cfg))
    adapters = random_adapters(cfg, targets)
    tensors, config = adapter_to_peft(adapters, cfg, r=R, alpha=ALPHA, dropout=0.05, targets=targets,
                                      base_model=None)
    for t in tensors.values():
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert all(t.data_ptr() != a.data_ptr() for t in tensors.values() for a in adapters.values())
    save_adapter(tmp_path / "adapter", tensors, config)

    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    reference = logits(load_weights(cfg, merge_adapter(base, adapters, r=R, alpha=ALPHA)), ids)
    base_logits = logits(random_gpt(cfg), ids)
    assert (reference - base_logits).abs().max() > 1e-2  # the adapter matters

    peft_model = load_peft(hf_base(cfg, base), tmp_path / "adapter")
    # PEFT wrapped exactly the exported modules, holds exactly the exported tensors, and would
    # save them under the same keys.
    assert lora_modules(peft_model) == {k.removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    state = peft_model.state_dict()
    for key, tensor in tensors.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], tensor), key
    # (PEFT's own save adds a full copy of a targeted lm_head's base weight; not needed to load.)
    assert peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).keys() == tensors.keys()
    assert peft_model.peft_config["default"].lora_alpha / peft_model.peft_config["default"].r == ALPHA / R

    assert (logits(peft_model, ids) - reference).abs().max().item() <= 1e-4
    merged = peft_model.merge_and_unload()
    assert not lora_modules(merged)
    assert (logits(merged, ids) - reference).abs().max().item() <= 1e-4

    # Sanity: B = 0 is the base model.
    zero_b = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}
    save_adapter(tmp_path / "zero", zero_b, config)
    assert (logits(load_peft(hf_base(cfg, base), tmp_path / "zero"), ids) - base_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_target_modules_select_exactly_the_targeted_linears(shape):
    """Each short target alone: PEFT's own matching wraps the modules whose adapters we export
    (GPT-2's attention c_proj and MLP c_proj stay apart)."""
    cfg = make_cfg(shape)
    for target in [*SHAPES[shape][1], "mlp"]:
        tensors, _ = adapter_to_peft(random_adapters(cfg, [target]), cfg, r=R, alpha=ALPHA, dropout=0.0,
                                     targets=[target], base_model=None)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf_config(cfg, None, None)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out fix-ups
            wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=R, target_modules=peft_target_modules(cfg, [target])))
        assert lora_modules(wrapped) == {k.removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}, target
    if cfg.family == "gpt2":
        assert peft_target_modules(cfg, ["proj", "down"]) == ["attn.c_proj", "mlp.c_proj"]
    else:
        assert peft_target_modules(cfg, ["qkv"]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def test_adapter_config_fields():
    cfg = make_cfg("gpt2-tied")
    _, config = adapter_to_peft(random_adapters(cfg, ["qkv"]), cfg, r=R, alpha=ALPHA, dropout=0.1,
                                targets=["qkv"], base_model="gpt2")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (R, ALPHA, 0.1)
    assert config["fan_in_fan_out"] and config["bias"] == "none" and config["inference_mode"]
    assert config["base_model_name_or_path"] == "gpt2" and config["target_modules"] == ["attn.c_attn"]
    assert not config["use_rslora"] and not config["use_dora"]


def test_merge_adapter_folds_in_the_scaled_product():
    cfg = make_cfg("llama-gqa-untied")
    base = {k: v.to(torch.bfloat16) for k, v in canonical_state_dict(random_gpt(cfg)).items()}
    adapters = random_adapters(cfg, ["down"])
    merged = merge_adapter(base, adapters, r=R, alpha=ALPHA)
    assert merged.keys() == base.keys()
    w, a, b = base["blocks.1.mlp.down.weight"], adapters["blocks.1.mlp.down.lora_A.weight"], \
        adapters["blocks.1.mlp.down.lora_B.weight"]
    assert merged["blocks.1.mlp.down.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["blocks.1.mlp.down.weight"], (w.float() + ALPHA / R * b @ a).bfloat16())
    assert merged["blocks.1.mlp.up.weight"] is base["blocks.1.mlp.up.weight"]


# -- inputs that do not fit ----------------------------------------------------------------

def export(adapters, cfg, targets):
    return lambda: adapter_to_peft(adapters, cfg, r=R, alpha=ALPHA, dropout=0.0, targets=targets, base_model=None)


@pytest.mark.parametrize("shape", SHAPES)
def test_adapters_that_do_not_fit_are_refused(shape):
    cfg, targets = make_cfg(shape), SHAPES[shape][1]
    adapters = random_adapters(cfg, targets)

    missing = dict(adapters)
    del missing["blocks.1.attn.qkv.lora_B.weight"]
    qkv_rows = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    one_line_error(CheckpointError, export(missing, cfg, targets), "blocks.1.attn.qkv.lora_B.weight is missing",
                   f"({qkv_rows}, {R})")

    wrong = {**adapters, "blocks.0.mlp.up.lora_A.weight": torch.zeros(R, 16)}
    one_line_error(CheckpointError, export(wrong, cfg, targets), "blocks.0.mlp.up.lora_A.weight",
                   f"shape ({R}, 16)", f"expects ({R}, {cfg.n_embd})")

    extra = {**adapters, "blocks.0.norm1.lora_A.weight": torch.zeros(R, cfg.n_embd)}
    one_line_error(CheckpointError, export(extra, cfg, targets), "blocks.0.norm1.lora_A.weight", "not expected")

    # An adapter trained on a wider model, exported against this one.
    wider = ModelConfig(**{**BASE, **SHAPES[shape][0], "n_embd": 64})
    one_line_error(CheckpointError, export(random_adapters(wider, targets), cfg, targets), "lora_A.weight",
                   f"shape ({R}, 64)", f"expects ({R}, 32)")

    one_line_error(CheckpointError, lambda: merge_adapter(canonical_state_dict(random_gpt(cfg)), missing, r=R,
                                                          alpha=ALPHA), "blocks.1.attn.qkv.lora_B.weight is missing")
    one_line_error(CheckpointError, lambda: merge_adapter(canonical_state_dict(random_gpt(cfg)), wrong, r=R,
                                                          alpha=ALPHA), "blocks.0.mlp.up.lora_A.weight",
                   f"shape ({R}, 16)")


def test_targets_the_model_lacks_are_refused():
    gpt2, llama = make_cfg("gpt2-tied"), make_cfg("llama-gqa-untied")
    one_line_error(ConfigError, lambda: adapter_shapes(gpt2, R, ["qkv", "gate"]),
                   "'gate' matches no layer of this model", "choose among qkv, proj, up, down, mlp")
    one_line_error(ConfigError, lambda: peft_target_modules(gpt2, ["head"]), "'head'", "tied embeddings")
    one_line_error(ConfigError, lambda: adapter_shapes(llama, R, ["attn"]), "'attn' is not a target")
    one_line_error(ConfigError, lambda: adapter_shapes(llama, R, []), "names no target")
    one_line_error(ConfigError, lambda: adapter_shapes(llama, 0, ["qkv"]), "rank=0")
    one_line_error(ConfigError, lambda: adapter_to_peft({}, llama, r=R, alpha=ALPHA, dropout=1.0, targets=["qkv"],
                                                        base_model=None), "dropout=1.0")
