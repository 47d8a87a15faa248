"""`gptscale finetune`, `generate --adapter`, `convert to-hf --adapter`, `lora merge` as users run
them (one process, no launcher): a LoRA run on a trained base, and every bad input a one-line
error with exit code 2 that writes nothing."""
import json
import shutil

import pytest

from gptscale.data.sft import prepare_sft
from gptscale.data.sources import embedded_documents
from gptscale.data.tokenizer import train_tokenizer
from tests.e2e.test_checkpoint_doors import SMALL, fingerprint, gptscale, one_line_error

FINETUNE = ["--set", "train.steps=2", "--set", "finetune.method=lora", "--set", "finetune.eval_answers=2",
            "--set", "finetune.answer_tokens=4", "--set", "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base (2 steps of synthetic pretraining), SFT data, a LoRA run from the base, and a base
    of another shape."""
    root = tmp_path_factory.mktemp("ft")
    train_tokenizer([text for _, text in embedded_documents("pydoc")][:100], 400, root / "tok")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(12)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_sft([str(root / "sft.jsonl")], root / "tok", root / "sft", seq_len=32,
                val_inputs=[str(root / "sft.jsonl")], progress=False)
    for name, extra in (("base", []), ("narrow", ["--set", "model.n_embd=32"])):
        done = gptscale("train", *SMALL, *extra, "--set", "data.synthetic=true", "--set", f"train.out_dir={root / name}",
                        "--set", "train.steps=1", "--set", "train.sample_tokens=0")
        assert done.returncode == 0, done.stderr[-3000:]
    base = root / "base" / "checkpoints" / "step00000001"
    done = gptscale("finetune", *SMALL, *FINETUNE, "--set", f"data.path={root / 'sft'}",
                    "--set", f"train.init_from={base}", "--set", f"train.out_dir={root / 'lora'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2: exact match on 2 held-out prompts" in done.stdout, done.stdout[-2000:]
    return {"root": root, "base": base, "lora": root / "lora" / "checkpoints" / "step00000002",
            "narrow": root / "narrow" / "checkpoints" / "step00000001", "sft": root / "sft"}


def test_adapters_sample_export_and_merge_through_the_cli(made, tmp_path):
    prompt = "User: What is 3 plus 3?\nAssistant: "
    done = gptscale("generate", "--checkpoint", str(made["base"]), "--adapter", str(made["lora"]), "--prompt", prompt,
                    "--temperature", "0", "--max-new-tokens", "4", "--tokenizer", str(made["sft"] / "tokenizer"))
    assert done.returncode == 0 and done.stdout.startswith(prompt), done.stderr[-2000:]
    with_adapter = done.stdout
    done = gptscale("lora", "merge", str(made["lora"]), str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = gptscale("generate", "--checkpoint", str(tmp_path / "merged"), "--prompt", prompt, "--temperature", "0",
                    "--max-new-tokens", "4")
    assert done.returncode == 0 and done.stdout == with_adapter, (done.stdout, with_adapter, done.stderr[-2000:])
    done = gptscale("convert", "to-hf", "--adapter", str(made["lora"]), str(tmp_path / "peft"))
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj"]


def _finetune(made, run, *extra):
    return gptscale("finetune", *SMALL, *FINETUNE, "--set", f"data.path={made['sft']}",
                    "--set", f"train.init_from={made['base']}", "--set", f"train.out_dir={run}", *extra)


@pytest.mark.parametrize("extra, needles", [
    (["--set", "train.init_from=null"], ["set train.init_from"]),
    (["--set", "finetune.lora.targets=qkv,gate"], ["'gate' matches no layer"]),
    (["--set", "finetune.lora.rank=0"], ["finetune.lora.rank=0 must be >= 1"]),
    (["--set", "data.path=null", "--set", "data.synthetic=true"], ["is not a fine-tuning folder", "prepare-sft"]),
])
def test_bad_finetune_settings_are_one_line_and_write_nothing(made, tmp_path, extra, needles):
    done = _finetune(made, tmp_path / "run", *extra)
    one_line_error(done, *needles)
    assert not (tmp_path / "run").exists()


def test_pretraining_on_a_fine_tuning_folder_is_refused(made, tmp_path):
    done = gptscale("train", *SMALL, "--set", f"data.path={made['sft']}", "--set", f"train.out_dir={tmp_path / 'r'}")
    one_line_error(done, "holds fine-tuning examples", "gptscale finetune")
    assert not (tmp_path / "r").exists()


def test_an_adapter_onto_a_base_of_another_shape_is_refused(made, tmp_path):
    done = gptscale("generate", "--checkpoint", str(made["narrow"]), "--adapter", str(made["lora"]), "--prompt", "x",
                    "--tokenizer", str(made["sft"] / "tokenizer"))
    one_line_error(done, "model.n_embd=64", "model.n_embd=32", "the base it was trained on")
    done = gptscale("lora", "merge", str(made["narrow"]), str(tmp_path / "out"), "--adapter", str(made["lora"]))
    one_line_error(done, "model.n_embd=64")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needles", [
    (["lora", "merge", "{base}", "{out}"], ["holds no LoRA adapters", "--adapter"]),
    (["convert", "to-hf", "--adapter", "{base}", "{out}"], ["is not a LoRA adapter folder"]),
    (["convert", "consolidate", "--with-optimizer", "{lora}", "{out}"], ["LoRA run's checkpoint", "--adapter"]),
    (["generate", "--checkpoint", "{lora}", "--adapter", "{lora}", "--prompt", "x"], ["already carries LoRA"]),
])
def test_adapter_commands_refuse_what_is_not_theirs(made, tmp_path, args, needles):
    names = {"base": made["base"], "lora": made["lora"], "out": tmp_path / "out"}
    done = gptscale(*[a.format(**names) for a in args])
    one_line_error(done, *needles)
    assert not (tmp_path / "out").exists()


def test_a_tampered_adapter_is_one_line_and_touches_nothing(made, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(made["lora"], ckpt)
    config = ckpt / "adapter" / "adapter_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "lora": {**settings["lora"], "rank": 4}}))
    before = fingerprint(ckpt)
    done = gptscale("convert", "to-hf", "--adapter", str(ckpt), str(tmp_path / "out"))
    one_line_error(done, "adapter_model.safetensors", "has shape", "its config says")
    config.write_text("[1, 2")
    done = gptscale("lora", "merge", str(made["base"]), str(tmp_path / "out"), "--adapter", str(ckpt))
    one_line_error(done, "adapter_config.json: not valid JSON")
    assert fingerprint(ckpt) == {**before, config.relative_to(ckpt): fingerprint(ckpt)[config.relative_to(ckpt)]}
    assert not (tmp_path / "out").exists()


def test_fine_tuning_from_a_folder_with_optimizer_state_starts_afresh(made, tmp_path):
    """A canonical folder written with --with-optimizer continues its own pretraining run; a
    fine-tuning run from it takes its weights only (not its step, Adam's state or data)."""
    folder = tmp_path / "with-optimizer"
    done = gptscale("convert", "consolidate", "--with-optimizer", "--quiet", str(made["base"]), str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    done = _finetune(made, tmp_path / "run", "--set", f"train.init_from={folder}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" not in done.stdout and "step 2: exact match" in done.stdout, done.stdout[-2000:]


def test_data_of_another_tokenizer_than_the_model_s_is_refused(made, tmp_path):
    folder = tmp_path / "base-with-tokenizer"
    done = gptscale("convert", "consolidate", "--quiet", str(made["base"]), str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    train_tokenizer([text for _, text in embedded_documents("pydoc")][100:160], 350, folder / "tokenizer")
    done = _finetune(made, tmp_path / "run", "--set", f"train.init_from={folder}")
    one_line_error(done, "tokenized with another tokenizer", "prepare the data with the model's tokenizer")
    assert not (tmp_path / "run").exists()


def test_pretraining_with_lora_is_refused(made, tmp_path):
    done = gptscale("train", *SMALL, "--set", "data.synthetic=true", "--set", "finetune.method=lora",
                    "--set", f"train.out_dir={tmp_path / 'r'}")
    one_line_error(done, "finetune.method=lora is for 'gptscale finetune'")


def test_a_lora_checkpoint_whose_base_is_gone_names_it(made, tmp_path):
    """A LoRA checkpoint holds the adapters alone; its base is train.init_from (by absolute path)."""
    base = tmp_path / "base"
    shutil.copytree(made["base"], base)
    run = tmp_path / "run"
    done = _finetune(made, run, "--set", f"train.init_from={base}")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = run / "checkpoints" / "step00000002"
    shutil.rmtree(base)
    done = gptscale("lora", "merge", str(ckpt), str(tmp_path / "out"))
    one_line_error(done, "holds LoRA adapters only", f"train.init_from={base}", "put the base back")
    done = gptscale("convert", "to-hf", "--adapter", str(ckpt), str(tmp_path / "peft"))  # the adapters alone still go
    assert done.returncode == 0, done.stderr[-2000:]
    done = _finetune(made, run, "--set", "train.steps=3", "--set", f"train.init_from={base}")
    one_line_error(done, str(base))
