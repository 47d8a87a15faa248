"""Checkpoints through the doors users open: `gptscale train` (resume, fresh start) and
`gptscale generate` on checkpoint folders that were reused, tampered with or moved."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "GPTSCALE_QUIET_SAVE": "1"}
SMALL = ["--set", "model.preset=tiny", "--set", "model.vocab_size=512", "--set", "model.n_layer=2",
         "--set", "model.n_embd=64", "--set", "model.block_size=64", "--set", "data.seq_len=32",
         "--set", "train.micro_batch=2", "--set", "train.eval_batches=1", "--set", "train.progress=false",
         "--set", "train.tensorboard=false", "--set", "train.eval_every=0"]


def gptscale(*args, cwd=None, timeout=300):
    env = {**ENV, "PYTHONPATH": os.pathsep.join([os.getcwd(), ENV.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def one_line_error(done, *needles):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("gptscale: error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def fingerprint(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two steps of synthetic training, done once; tests work on copies."""
    run = tmp_path_factory.mktemp("trained") / "run"
    done = gptscale("train", *SMALL, "--set", "data.synthetic=true", "--set", f"train.out_dir={run}",
                    "--set", "train.steps=2", "--set", "train.sample_tokens=0")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _train(run, *extra):
    return gptscale("train", *SMALL, "--set", "data.synthetic=true", "--set", f"train.out_dir={run}",
                    "--set", "train.sample_tokens=0", *extra)


def test_a_fresh_start_in_a_used_run_folder_is_refused_unless_asked(trained, tmp_path):
    run = _copy(trained, tmp_path)
    before = fingerprint(run / "checkpoints")
    one_line_error(_train(run, "--set", "train.steps=3", "--resume", "none"), "already holds checkpoints",
                   "--overwrite-run")
    assert fingerprint(run / "checkpoints") == before  # nothing touched
    (run / "checkpoints" / "step00000002" / "COMPLETE.json").write_text("{damaged")  # cleared all the same
    done = _train(run, "--set", "train.steps=1", "--overwrite-run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step00000001"]
    assert (run / "checkpoints" / "latest").read_text() == "step00000001"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1} and [r["step"] for r in rows if "loss" in r] == [1]  # the old run's gone


def test_an_explicit_resume_into_a_new_run_folder_starts_a_new_run(trained, tmp_path):
    done = _train(tmp_path / "elsewhere", "--set", "train.steps=3", "--resume",
                  str(trained / "checkpoints" / "step00000002"))
    assert done.returncode == 0 and "resumed from" in done.stdout, done.stderr[-3000:]
    new = json.loads((tmp_path / "elsewhere" / "checkpoints" / "step00000003" / "COMPLETE.json").read_text())
    old = json.loads((trained / "checkpoints" / "step00000002" / "COMPLETE.json").read_text())
    assert new["run_id"] != old["run_id"]


def test_a_pickled_payload_in_a_checkpoint_does_nothing(trained, tmp_path):
    marker = tmp_path / "pwned"
    for victim in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        run = _copy(trained, tmp_path / victim)
        ckpt = run / "checkpoints" / "step00000002"
        with open(ckpt / victim, "wb") as f:
            pickle.dump({"module": _Trap(marker)}, f)
        one_line_error(_train(run, "--set", "train.steps=3"), victim)
        one_line_error(gptscale("generate", "--checkpoint", str(ckpt), "--prompt", "x",
                                "--tokenizer", str(tmp_path / "none")), victim)
        assert not marker.exists()
    # gptscale's own rank state is no pickle at all: one put there is refused too.
    run = _copy(trained, tmp_path / "rank_state")
    ckpt = run / "checkpoints" / "step00000002"
    (ckpt / "gptscale_rank00000.safetensors").write_bytes(pickle.dumps(_Trap(marker)))
    one_line_error(_train(run, "--set", "train.steps=3"), "gptscale_rank00000.safetensors")
    assert not marker.exists()


def test_a_missing_rank_state_is_named_not_silently_restarted(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "step00000002" / "gptscale_rank00000.safetensors").unlink()
    one_line_error(_train(run, "--set", "train.steps=3"), "lacks gptscale_rank00000.safetensors")


def test_a_damaged_complete_json_is_one_error(trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "step00000002" / "COMPLETE.json").write_text("{not json")
    one_line_error(_train(run, "--set", "train.steps=3"), "COMPLETE.json")
    one_line_error(gptscale("generate", "--checkpoint", str(run / "checkpoints" / "step00000002"), "--prompt", "x"),
                   "COMPLETE.json")


def test_generate_uses_the_checkpoint_s_own_tokenizer_and_refuses_another(tmp_path, shards):
    """Trained with a relative data.path; generated from another folder; the data folder then moved away."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(shards, work / "data")
    done = gptscale("train", *SMALL, "--set", "data.path=data", "--set", "data.num_workers=0",
                    "--set", "train.out_dir=run", "--set", "train.steps=1", "--set", "train.sample_tokens=0", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = work / "run" / "checkpoints" / "step00000001"
    shutil.move(work / "data", tmp_path / "moved")
    done = gptscale("generate", "--checkpoint", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("def "), done.stderr[-3000:]
    from gptscale.data.sources import embedded_documents
    from gptscale.data.tokenizer import train_tokenizer

    other = train_tokenizer([text for _, text in embedded_documents("pydoc")][:20], 300, tmp_path / "other_tok")
    one_line_error(gptscale("generate", "--checkpoint", str(ckpt), "--prompt", "x", "--tokenizer",
                            str(other.path)), "is not the tokenizer")
    # A checkpoint whose own tokenizer copy was swapped is refused the same way.
    shutil.copy(other.path, ckpt / "tokenizer" / "tokenizer.json")
    one_line_error(gptscale("generate", "--checkpoint", str(ckpt), "--prompt", "x"), "is not the tokenizer")

