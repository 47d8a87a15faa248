"""Every command fed a few hundred generated bad inputs: wrong --set values for every config
field, garbage config files, bad numbers, paths that are missing or the wrong kind, damaged
files. Each must end with exit code 2 and one line `gptscale: error: ...` (or succeed, where
a generated value happens to be valid): never a traceback, never a hang."""
import dataclasses
import json
import os
import random
import subprocess
import sys
import typing
from pathlib import Path

from gptscale.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig

HERE = Path(__file__).parent
BAD = {
    int: ["-1", "0", "1.5", "abc", "[1]", "{a: 1}", ".inf", "null", "true", "''", "[", "99999999999999999999", "-7e3"],
    float: ["-1", "0", ".nan", ".inf", "-.inf", "abc", "[", "{}", "null", "1e400", "true", "'1e-3'", "-1e-12"],
    str: ["[1, 2]", "{a: b}", "1", "null", "*x", "''", "'../../../etc'", "'pipe:echo x'", "&a b"],
    bool: ["2", "abc", "[", "null", "{}", "1.0"],
}
GARBAGE_CONFIGS = ["[", "- a\n- b\n", "!!python/object/apply:os.system ['echo pwned']\n", "{" * 20000, "model: " + "[" * 5000,
                   "a: &x 1\nb: *x\n", "train: {steps: 3}\ntrain: {lr: 1}\n", "model: {preset: [1]}\n", "model: 5\n",
                   "3\n", "null\n", "model:\n  n_layer: 2\n   n_head: 3\n", "\t- :", "data: {path: /nonexistent}\n"]
BAD_OVERRIDES = ["model", "model.", ".x=1", "model.n_layer.x=3", "=3", "a.b.c.d=1", "model.n_layer=", "train=3",
                 "model.preset=nope", "parallel.tp=7", "parallel.pp=3", "parallel.mode=zero3",
                 "data.synthetic=false", "model.family=gpt5"]


def _kind(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in BAD else str


def _field_cases(rng) -> list[list[str]]:
    cases = []
    for section, cls in (("model", ModelConfig), ("parallel", ParallelConfig), ("data", DataConfig),
                         ("train", TrainConfig)):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            for value in rng.sample(BAD[_kind(hints[field.name])], 3):
                cases.append(["info", "--set", "data.synthetic=true", "--set", f"{section}.{field.name}={value}"])
    return cases


def _argument_cases(tmp: Path) -> list[list[str]]:
    (tmp / "a_file").write_text("x")
    (tmp / "empty_dir").mkdir()
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    (tmp / "run2").mkdir()
    (tmp / "run2" / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"loss": "x", "step": 2}\n')
    damaged = tmp / "checkpoints" / "step00000001"
    damaged.mkdir(parents=True)
    (damaged / "COMPLETE.json").write_text('{"step": "one"}')
    forged = tmp / "forged" / "step00000001"
    forged.mkdir(parents=True)
    (forged / "COMPLETE.json").write_text(json.dumps({"step": 1, "model": {}, "layout": {"mode": "zero3", "tp": 1,
                                                                                        "pp": 1, "dp": 1}}))
    (forged / "config.yaml").write_text("model: {preset: tiny}\ndata: {synthetic: true}\n")
    cases = [[], ["bogus"], ["--nope"], ["presets", "extra"]]
    cases += [["info", "--world-size", n] for n in ("-1", "0", "x", "7")]
    cases += [["info", "--config", str(p)] for p in (tmp / "empty_dir", tmp / "missing.yaml", tmp / "a_file")]
    cases += [["selftest", "--ranks", n] for n in ("0", "-2", "x", "3")] + [["selftest", "--timeout", "x"]]
    tok = ["data", "train-tokenizer", "--out", str(tmp / "tok")]
    cases += [[*tok, "--input", "/nonexistent", "--vocab-size", "300"], [*tok, "--input", "builtin:nope",
                                                                          "--vocab-size", "300"]]
    cases += [[*tok, "--input", "builtin:pydoc", "--vocab-size", v] for v in ("0", "10", "x", "-5")]
    cases += [[*tok, "--input", str(tmp / "empty_dir"), "--vocab-size", "300"], ["data", "train-tokenizer"]]
    prep = ["data", "prepare", "--input", "builtin:pydoc", "--out", str(tmp / "shards")]
    cases += [[*prep, "--tokenizer", t] for t in ("/nonexistent", str(tmp / "a_file"), str(tmp / "empty_dir"))]
    cases += [[*prep, "--tokenizer", "/nonexistent", "--shard-size", s] for s in ("inf", "0", "-5", "1e20", "abc", "nan")]
    cases += [[*prep, "--tokenizer", "/nonexistent", "--val-fraction", f] for f in ("1", "-0.1", "nan", "x")]
    cases += [[*prep, "--tokenizer", "/nonexistent", "--workers", w] for w in ("0", "-1", "x")]
    cases += [["data", "inspect", str(p)] for p in ("/nonexistent", tmp / "a_file", tmp / "empty_dir")]
    cases += [["data", "inspect", str(tmp / "empty_dir"), "--tokens", "0"]]
    gen = ["generate", "--prompt", "x"]
    cases += [[*gen, "--checkpoint", str(p)] for p in ("/nonexistent", tmp / "a_file", tmp / "empty_dir", damaged,
                                                       forged)]
    cases += [[*gen, "--checkpoint", str(damaged), flag, v] for flag, values in
              (("--max-new-tokens", ("0", "-5", "x")), ("--top-k", ("0", "-1")),
               ("--temperature", ("-1", "nan", "inf", "x")), ("--seed", ("-1", "x"))) for v in values]
    cases += _convert_cases(tmp, damaged, forged)
    cases += [["plot", str(p)] for p in ("/nonexistent", tmp / "empty_dir", tmp / "a_file", tmp / "run",
                                         tmp / "run2")]
    train = ["train", "--set", "model.preset=tiny", "--set", "model.n_layer=2", "--set", "train.progress=false",
             "--set", f"train.out_dir={tmp / 'train_run'}"]
    cases += [[*train, "--set", s] for s in ("data.path=/nonexistent", f"data.path={tmp / 'empty_dir'}")]
    cases += [[*train, "--set", "data.synthetic=true", "--set", s] for s in (
        "train.ds_config=/nonexistent.json", f"train.ds_config={tmp / 'a_file'}", "train.init_from=/nonexistent",
        "parallel.pp=2", "parallel.dp=3", "train.ds_config=pipe_zero1")]
    cases += [[*train, "--set", "data.synthetic=true", "--resume", r] for r in ("/nonexistent", str(damaged))]
    cases += [[*train, "--set", "data.synthetic=true", "--resume", "none", "--overwrite-run", "--set", "train.steps=0"]]
    return cases


def _convert_cases(tmp: Path, damaged: Path, forged: Path) -> list[list[str]]:
    """Folders that look like a canonical or Hugging Face folder and are not."""
    folders = {
        "hf_garbage_json": {"config.json": "{" * 5000},
        "hf_list": {"config.json": "[1, 2]"},
        "hf_mistral": {"config.json": json.dumps({"model_type": "mistral"})},
        "hf_wrong_types": {"config.json": json.dumps({"model_type": "llama", "hidden_size": "big", "vocab_size": -3})},
        "hf_pickle": {"config.json": json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2,
                                                 "vocab_size": 10, "n_positions": 8}), "pytorch_model.bin": "x"},
        "hf_bad_weights": {"config.json": json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2,
                                                      "vocab_size": 10, "n_positions": 8}),
                           "model.safetensors": "\xff" * 64},
        "canonical_bad_index": {"config.yaml": "model: {preset: tiny}\n",
                                "model.safetensors.index.json": json.dumps({"weight_map": {"a": "../../etc/passwd"}})},
        "canonical_forged_header": {"config.yaml": "model: {preset: tiny}\n",
                                    "model.safetensors": "\x40" + "\x00" * 7 + '{"a": {"dtype": "F32", "shape": '
                                                         '[1000000000], "data_offsets": [0, 4000000000]}}'},
    }
    for name, files in folders.items():
        (tmp / name).mkdir()
        for file, text in files.items():
            (tmp / name / file).write_text(text)
    sources = ["/nonexistent", tmp / "a_file", tmp / "empty_dir", damaged, forged, *(tmp / n for n in folders)]
    cases = []
    for command in ("consolidate", "to-hf", "from-hf"):
        cases += [["convert", command, str(p), str(tmp / "out")] for p in sources]
        cases += [["convert", command, str(forged), str(tmp / "out"), flag, v] for flag, values in
                  (("--dtype", ("fp8", "")), ("--max-shard-size", ("0", "-1", "x"))) for v in values]
        cases += [["convert", command, str(forged), str(tmp / "empty_dir")], ["convert", command]]
    return cases + [["generate", "--prompt", "x", "--checkpoint", str(tmp / n)] for n in folders]


def _config_cases(tmp: Path) -> list[list[str]]:
    cases = []
    for i, text in enumerate(GARBAGE_CONFIGS):
        path = tmp / f"garbage{i}.yaml"
        path.write_text(text)
        # train: a garbage file that happens to parse (an empty one is the defaults) must not start a run.
        cases += [["info", "--config", str(path)], ["train", "--config", str(path), "--set", "train.steps=0"]]
    binary = tmp / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    cases.append(["info", "--config", str(binary)])
    cases += [["info", "--set", text] for text in BAD_OVERRIDES]
    cases += [["train", "--set", text, "--set", "train.steps=0"] for text in BAD_OVERRIDES]
    return cases


def test_bad_input_to_every_command_is_one_line_and_exit_2(tmp_path):
    rng = random.Random(20261128)
    cases = _field_cases(rng) + _argument_cases(tmp_path) + _config_cases(tmp_path)
    assert len(cases) > 300
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(HERE.parents[1])}
    done = subprocess.run([sys.executable, str(HERE / "fuzz_runner.py")], input=json.dumps(
        {"cases": cases, "cwd": str(tmp_path), "seconds": 60}), capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases)
    bad = []
    for result in results:
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        ok = result["code"] == 0 or (result["code"] == 2 and len(lines) == 1 and lines[0].startswith("gptscale: error:"))
        if not ok or result["timed_out"]:
            bad.append(f"{result['argv']}: exit {result['code']}, timed out {result['timed_out']}: "
                       f"{result['stderr'][-600:]}")
    assert not bad, f"{len(bad)} of {len(cases)} cases:\n" + "\n".join(bad[:15])
    assert sum(r["code"] == 2 for r in results) > 250  # most generated inputs really are bad
