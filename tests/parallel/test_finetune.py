"""Fine-tuning in every run mode, through `train` with the FineTuning task on 4 gloo ranks.

LoRA runs of the same data and starting weights agree across modes and layouts (zero3
TP2xDP2 and TP1xDP4, pipe_zero3, pipe; the loss is the mean over the labelled tokens of the
whole step, so how a step's examples are split over ranks does not matter), only the adapters
change (the base is bitwise the starting weights), a LoRA checkpoint resumes at its own and at
another layout with the same losses, and what it holds goes out through the same doors users
take: a Hugging Face base + a PEFT adapter that transformers/peft run to gptscale's logits,
and `lora merge`.
"""
import json

import pytest
import torch

from gptscale.checkpoint.adapter import AdapterFolder
from gptscale.checkpoint.merge import merge_into_canonical
from gptscale.checkpoint.peft_folder import write_peft
from gptscale.checkpoint.hf_folder import write_hf
from gptscale.checkpoint.convert import open_source
from gptscale.data.sft import prepare_sft
from gptscale.data.sources import embedded_documents
from gptscale.data.tokenizer import train_tokenizer
from gptscale.parallel.lora import is_adapter
from gptscale.testing.distributed import run_ranks
from gptscale.train.sample import load_dense_model
from tests.parallel.training import ENV, SMALL_LLAMA, SMALL_MODEL, finetune_in_turn, save_init_weights

pytestmark = pytest.mark.dist
STEPS = 4


def sft_folder(root):
    texts = [text for _, text in embedded_documents("pydoc")][:200]
    tok = train_tokenizer(texts + ["User: what is it?\nAssistant: It is here."] * 10, 400, root / "tok")
    # Responses of 1 to ~12 tokens: micro-batches carry different numbers of labelled tokens.
    rows = [{"prompt": f"What is {i} plus {i}?", "response": "It is " + " and".join([str(2 * i)] * (1 + i % 5))}
            for i in range(64)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    prepare_sft([str(root / "train.jsonl")], root / "tok", root / "sft", seq_len=32,
                val_inputs=[str(root / "val.jsonl")], progress=False)
    return tok, root / "sft"


def run(tmp_path, data, name, model, init, *extra):
    return [*model, f"data.path={data}", "data.seq_len=32", f"train.out_dir={tmp_path / name}",
            f"train.steps={STEPS}", "train.micro_batch=2", "train.grad_accum=2", "train.lr=3e-3",
            "train.min_lr=3e-4", "train.warmup_steps=1", "train.weight_decay=0.0", "train.eval_every=0",
            "train.eval_batches=1", "train.progress=false", "train.tensorboard=false", "train.sample_tokens=0",
            f"train.init_from={init}", "finetune.method=lora", "finetune.lora.rank=4", "finetune.eval_answers=3",
            "finetune.answer_tokens=4", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    tok, data = sft_folder(tmp)
    llama = [*SMALL_LLAMA, "finetune.lora.targets=qkv,proj,mlp,head"]
    llama_init = save_init_weights(tmp / "llama.safetensors", SMALL_LLAMA)
    gpt2_init = save_init_weights(tmp / "gpt2.safetensors", SMALL_MODEL)
    a_ckpt2 = tmp / "a" / "checkpoints" / "step00000002"
    plan = {
        "a": (run(tmp, data, "a", llama, llama_init, "parallel.tp=2", "train.save_every=2"), "none"),
        "tp1dp4": (run(tmp, data, "tp1dp4", llama, llama_init, "train.micro_batch=1"), "none"),
        "pipe_zero3": (run(tmp, data, "pipe_zero3", llama, llama_init, "parallel.pp=2", "parallel.mode=pipe_zero3",
                           "train.ds_config=zero3"), "none"),
        "resumed": (run(tmp, data, "a", llama, llama_init, "parallel.tp=2"), str(a_ckpt2)),
        "at_pipe": (run(tmp, data, "at_pipe", llama, llama_init, "parallel.pp=2"), str(a_ckpt2)),
        "gpt2_pipe": (run(tmp, data, "gpt2_pipe", SMALL_MODEL, gpt2_init, "parallel.pp=2"), "none"),
        "gpt2_full": (run(tmp, data, "gpt2_full", SMALL_MODEL, gpt2_init, "parallel.tp=2", "finetune.method=full",
                          "train.steps=2"), "none"),
    }
    results = run_ranks(finetune_in_turn, 4, list(plan.values()), timeout=600, env=ENV)[0]
    return tmp, dict(zip(plan, results)), {"llama": llama_init, "gpt2": gpt2_init}


def final(tmp, name, step=STEPS):
    return tmp / name / "checkpoints" / f"step{step:08d}"


def close(a, b, tol):
    return all(abs(a[s] - b[s]) <= tol for s in b)


def test_lora_losses_agree_across_modes_and_how_the_step_is_split(runs):
    _, r, _ = runs
    a = r["a"]["losses"]
    assert len(a) == STEPS and a[STEPS] < a[1]
    # TP1 x DP4 with micro_batch 1 sees each step's 8 examples in other micro-batches: only a
    # loss averaged over the step's labelled tokens is the same.
    assert close(r["tp1dp4"]["losses"], a, 2e-5), (r["tp1dp4"]["losses"], a)
    assert close(r["pipe_zero3"]["losses"], a, 2e-5), (r["pipe_zero3"]["losses"], a)


def test_a_lora_checkpoint_resumes_at_its_layout_and_at_another(runs):
    _, r, _ = runs
    a = r["a"]["losses"]
    assert sorted(r["resumed"]["losses"]) == [3, 4]
    assert all(r["resumed"]["losses"][s] == a[s] for s in (3, 4)), (r["resumed"]["losses"], a)
    assert close(r["at_pipe"]["losses"], {s: a[s] for s in (3, 4)}, 2e-5), (r["at_pipe"]["losses"], a)


@pytest.mark.parametrize("name, family", [("a", "llama"), ("pipe_zero3", "llama"), ("at_pipe", "llama"),
                                          ("gpt2_pipe", "gpt2")])
def test_only_the_adapters_change_and_only_they_are_saved(runs, name, family):
    tmp, r, init = runs
    from safetensors.torch import load_file

    # Every rank's shards of the frozen base are bitwise what they were before training.
    assert r[name]["frozen"] > 0 and r[name]["frozen_unchanged"], r[name]
    start = load_file(init[family])
    source = open_source(final(tmp, name))  # the adapters from the checkpoint, the base from init_from
    adapters = [n for n in source.names if is_adapter(n)]
    assert adapters and set(source.names) - set(adapters) == set(start)
    assert all(source.tensor(n).abs().sum() > 0 for n in adapters if ".lora_B." in n)
    # DeepSpeed's files hold the adapters and their optimizer state, not the frozen base.
    deepspeed_bytes = sum(f.stat().st_size for f in final(tmp, name).rglob("*.pt"))
    base_bytes = sum(t.numel() * 4 for t in start.values())
    assert deepspeed_bytes < base_bytes / 2, (deepspeed_bytes, base_bytes)
    # The adapter folder holds the same adapters, alone.
    folder = AdapterFolder(final(tmp, name))
    assert set(folder.shapes) == set(adapters)
    assert all(torch.equal(folder.tensors()[n], source.tensor(n)) for n in adapters)


def test_full_fine_tuning_changes_the_base(runs):
    tmp, r, init = runs
    from safetensors.torch import load_file

    start = load_file(init["gpt2"])
    reader = open_source(final(tmp, "gpt2_full", 2))
    assert not any(is_adapter(n) for n in reader.names)
    assert all(not torch.equal(reader.tensor(n), start[n].float()) for n in start if n.endswith("qkv.weight"))
    assert r["gpt2_full"]["exact_match"] is not None


def test_exact_match_is_scored_before_and_after(runs):
    _, r, _ = runs
    for name in ("a", "tp1dp4", "gpt2_pipe"):  # live model (zero3) and final checkpoint (pipe)
        assert 0.0 <= r[name]["exact_match"] <= 1.0
    assert r["a"]["exact_match_before"] is not None  # zero3 scores the live model before training


@pytest.mark.parametrize("name", ["a", "gpt2_pipe"])
def test_peft_on_the_exported_base_computes_gptscale_s_logits(runs, name):
    """`convert to-hf` of a LoRA checkpoint (its base) + `convert to-hf --adapter` (PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _, _ = runs
    ckpt = final(tmp, name)
    write_hf(open_source(ckpt), tmp / f"{name}_hf")
    write_peft(ckpt, tmp / f"{name}_peft", base=str(tmp / f"{name}_hf"))
    cfg, ours, _ = load_dense_model(ckpt)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp / f"{name}_hf"), tmp / f"{name}_peft")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - ours.full_logits(ours(ids))).abs().max().item()
        base = AutoModelForCausalLM.from_pretrained(tmp / f"{name}_hf")
        adapter_effect = (base(ids).logits - ours.full_logits(ours(ids))).abs().max().item()
    assert diff <= 1e-4 and adapter_effect > 1e-3, (diff, adapter_effect)


def test_lora_merge_writes_the_adapted_model_as_full_weights(runs):
    tmp, _, _ = runs
    ckpt = final(tmp, "a")
    assert merge_into_canonical(ckpt, tmp / "merged") == 5 * 4 + 1  # qkv, proj, up, gate, down in 4 blocks; head
    _, ours, _ = load_dense_model(ckpt)
    cfg, merged, _ = load_dense_model(tmp / "merged")
    assert cfg.lora is None and not any(is_adapter(n) for n, _ in merged.named_parameters())
    ids = torch.randint(0, cfg.model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (merged.full_logits(merged(ids)) - ours.full_logits(ours(ids))).abs().max().item() <= 1e-5
