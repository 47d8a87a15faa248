"""`gptscale convert` through its doors: a TP=2 run's checkpoint consolidated, exported to
Hugging Face (loaded by transformers, same logits, same greedy text), imported back bitwise,
and used as train.init_from at other layouts; bad inputs end in one line and leave nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from gptscale.testing.distributed import run_ranks
from tests.e2e.test_checkpoint_doors import one_line_error
from tests.parallel.training import ENV, SMALL_LLAMA, train_in_turn, train_layouts

pytestmark = pytest.mark.dist

# Grouped-query attention, untied head, and a vocabulary (515) that is no multiple of 64: TP=2
# pads it to 640 rows, which every conversion must drop.
MODEL = [*SMALL_LLAMA, "model.vocab_size=515"]
STEPS = 4


def run_config(tmp_path, shards, name, *extra):
    return [*MODEL, f"data.path={shards}", "data.seq_len=32", "data.num_workers=0", f"train.out_dir={tmp_path / name}",
            f"train.steps={STEPS}", "train.micro_batch=4", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=2",
            f"train.eval_every={STEPS}", "train.eval_batches=2", "train.progress=false", "train.tensorboard=false",
            "train.sample_tokens=0", *extra]


def gptscale(*args, timeout=300):
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(done):
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """4 steps at zero3 TP=2 on real text, with the validation loss at the end."""
    root = tmp_path_factory.mktemp("convert")
    result = run_ranks(train_layouts, 2, [run_config(root, shards, "tp2", "parallel.tp=2")], timeout=400, env=ENV)[0][0]
    return root, root / "tp2" / "checkpoints" / f"step{STEPS:08d}", result["val"][STEPS]


def dense_model(folder):
    """gptscale's own dense model from a canonical folder."""
    from gptscale.checkpoint.canonical import CanonicalFolder
    from gptscale.convert.tp import split_tp
    from gptscale.model.gpt import GPT
    from gptscale.parallel.layers import split_table

    source = CanonicalFolder(folder)
    model = GPT(source.cfg.model)
    weights = {name: source.tensor(name) for name in source.names}
    model.load_state_dict(split_tp(weights, split_table(model), 1, model.padded_vocab)[0])
    return model.eval(), source.cfg


def test_consolidate_export_import_and_start_elsewhere(trained, shards, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptscale.train.batches import validation_batches

    root, ckpt, run_val = trained
    canon, hf, back, hf_again = (tmp_path / n for n in ("canon", "hf", "back", "hf_again"))
    ok(gptscale("convert", "consolidate", str(ckpt), str(canon), "--quiet"))
    model, cfg = dense_model(canon)
    assert cfg.model.vocab_size == 515 and model.padded_vocab == 576
    # The consolidated weights score the run's own validation loss on its held-out batches.
    with torch.no_grad():
        losses = [model(x, labels=y).item() for x, y in validation_batches(cfg, 0, 1)]
    assert abs(sum(losses) / len(losses) - run_val) < 1e-5, (losses, run_val)

    # To Hugging Face, in two safetensors shards: transformers loads model and tokenizer offline.
    ok(gptscale("convert", "to-hf", str(canon), str(hf), "--max-shard-size", "1", "--quiet"))
    assert (hf / "model.safetensors.index.json").is_file()
    settings = json.loads((hf / "config.json").read_text())
    assert settings["vocab_size"] == 515 and settings["num_key_value_heads"] == 2 and settings["eos_token_id"] == 2
    hf_model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    ids = torch.tensor([tok.encode("def main():\n    return", add_special_tokens=False)])
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert theirs.shape[-1] == 515
    assert (ours[..., :515] - theirs).abs().max() < 1e-4

    # Greedy generation: transformers' and `gptscale generate` (on the checkpoint, the canonical
    # folder and the exported folder) write the same tokens.
    with torch.no_grad():
        greedy = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    expected = tok.decode(greedy[0].tolist())
    texts = [ok(gptscale("generate", "--checkpoint", str(where), "--prompt", "def main():\n    return",
                         "--max-new-tokens", "12", "--temperature", "0")).rstrip("\n") for where in (ckpt, canon, hf)]
    assert texts == [expected] * 3, (texts, expected)

    # from-hf then to-hf: the same bytes.
    ok(gptscale("convert", "from-hf", str(hf), str(back), "--quiet"))
    ok(gptscale("convert", "to-hf", str(back), str(hf_again), "--max-shard-size", "1", "--quiet"))
    for file in sorted(p.name for p in hf.glob("model*")):
        assert (hf / file).read_bytes() == (hf_again / file).read_bytes(), file

    # train.init_from at other layouts (pipeline stages; TP=2 from the Hugging Face folder): the
    # validation loss before the first step is the consolidated one. And the checkpoint itself
    # resumes at DP=2 (its data re-dealt to two readers) and trains on.
    starts = [(run_config(tmp_path, shards, "pipe", "parallel.pp=2", f"train.init_from={canon}", "train.steps=1",
                          "train.eval_every=1"), "none"),
              (run_config(tmp_path, shards, "tp2_hf", "parallel.tp=2", f"train.init_from={hf}", "train.steps=1",
                          "train.eval_every=1"), "none"),
              (run_config(tmp_path, shards, "dp2", "train.micro_batch=2", f"train.steps={STEPS + 2}"), str(ckpt))]
    *started, resumed = run_ranks(train_in_turn, 2, starts, timeout=400, env=ENV)[0]
    for result in started:
        assert abs(result["val"][0] - run_val) < 1e-5, (result["val"], run_val)
    assert sorted(resumed["losses"]) == [STEPS + 1, STEPS + 2] and resumed["losses"][STEPS + 2] < 7, resumed


def test_bad_inputs_are_one_line_and_leave_nothing(trained, tmp_path):
    _, ckpt, _ = trained
    out = tmp_path / "out"

    def refused(*args, needles):
        one_line_error(gptscale("convert", *args, "--quiet"), *needles)
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*")), sorted(tmp_path.iterdir())

    # A rank's partition file missing.
    broken = tmp_path / "missing"
    shutil.copytree(ckpt, broken)
    (broken / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    refused("consolidate", str(broken), str(out), needles=["zero_pp_rank_0_mp_rank_01_optim_states.pt", "missing"])
    # A config whose shapes do not match the tensors.
    wrong = tmp_path / "wrong"
    shutil.copytree(ckpt, wrong)
    settings = yaml.safe_load((wrong / "config.yaml").read_text())
    settings["model"]["ffn_hidden"] = 192
    (wrong / "config.yaml").write_text(yaml.safe_dump(settings))
    refused("consolidate", str(wrong), str(out), needles=["mlp", "config"])
    # A truncated safetensors file.
    canon = tmp_path / "canon"
    ok(gptscale("convert", "consolidate", str(ckpt), str(canon), "--quiet"))
    data = (canon / "model.safetensors").read_bytes()
    (canon / "model.safetensors").write_bytes(data[:len(data) // 2])
    refused("to-hf", str(canon), str(out), needles=["model.safetensors"])
    # A Hugging Face folder of another architecture, and one with pickled weights only.
    hf = tmp_path / "hf"
    ok(gptscale("convert", "to-hf", str(ckpt), str(hf), "--quiet"))
    settings = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**settings, "model_type": "mistral"}))
    refused("from-hf", str(hf), str(out), needles=["model_type='mistral'", "gpt2 and llama"])
    (hf / "config.json").write_text(json.dumps(settings))
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    refused("from-hf", str(hf), str(out), needles=["pytorch_model.bin", "pickle"])
    # An output that exists is never merged into or replaced.
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    one_line_error(gptscale("convert", "consolidate", str(ckpt), str(out), "--quiet"), "already exists")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_consolidate_with_optimizer_keeps_master_weights_moments_and_position(trained, tmp_path):
    from gptscale.checkpoint.canonical import CanonicalFolder
    from gptscale.checkpoint.read import CheckpointReader

    _, ckpt, _ = trained
    out = tmp_path / "bf16"
    ok(gptscale("convert", "consolidate", str(ckpt), str(out), "--dtype", "bf16", "--with-optimizer",
                "--max-shard-size", "1", "--quiet"))
    saved, canon = CheckpointReader(ckpt), CanonicalFolder(out)
    assert len(list(out.glob("optimizer-*.safetensors"))) > 1 and canon.weights.metadata["dtype"] == "bf16"
    for name in saved.names:
        master = saved.tensor(name, "master")
        assert canon.tensor(name, "weights").dtype == torch.bfloat16
        assert torch.equal(canon.tensor(name, "weights"), master.bfloat16())
        assert torch.equal(canon.tensor(name, "master"), master)  # kept apart: the weights are rounded
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(canon.tensor(name, moment), saved.tensor(name, moment)), (name, moment)
    assert saved.tensor("head.weight", "exp_avg_sq").abs().sum() > 0  # the moments are real, not zeros
    state = canon.trainer_state()
    assert (state["step"], state["adam_step"], state["layout"]) == (STEPS, STEPS, {"mode": "zero3", "tp": 2, "pp": 1,
                                                                                      "dp": 1})
    assert len(state["data"]) == 2 and state["data"][0] == state["data"][1]  # both TP ranks read the same stream
