"""`gptscale data prepare-sft`, run as a user runs it: a good run's summary and shards (read
with webdataset itself), --overwrite, and every bad input as one line naming the file and
line, exit code 2, and nothing written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gptscale.data.sft import load_sft_split
from gptscale.data.sources import embedded_documents
from gptscale.data.tokenizer import train_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GOOD = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(30)] + [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                  {"role": "assistant", "content": "Bye."}]},
    {"prompt": "Say a long thing.", "response": "word " * 120},
]


def gptscale(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**ENV, "PYTHONPATH": os.getcwd()}, cwd=cwd)


def one_line_error(done, *needles):
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptscale: error:") and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [text for _, text in embedded_documents("pydoc")][:200]
    return os.path.dirname(train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok")).path)


def prepare_sft(tokenizer, out, *inputs, seq_len=80, extra=()):
    args = ["data", "prepare-sft", "--tokenizer", tokenizer, "--out", str(out), "--seq-len", str(seq_len)]
    for source in inputs:
        args += ["--input", source]
    return gptscale(*args, *extra)


def test_a_good_run_summarises_and_webdataset_reads_its_shards(tokenizer, tmp_path):
    import webdataset

    source = write_lines(tmp_path / "a.jsonl", GOOD)
    val = write_lines(tmp_path / "v.jsonl", GOOD[:4])
    done = prepare_sft(tokenizer, tmp_path / "out", source, extra=["--val-input", val, "--shard-size", "8KB"])
    assert done.returncode == 0, done.stderr
    [summary] = done.stdout.splitlines()
    assert summary.startswith("sft: 32 train + 4 val examples, ") and "labelled" in summary
    assert "1 truncated to --seq-len 80 + 1" in summary and f"{tmp_path / 'out'}/manifest.json" in summary
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["seq_len"] == 80
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    examples = load_sft_split(tmp_path / "out", "train")
    seen = 0
    for shard in manifest["splits"]["train"]["shards"]:
        for sample in webdataset.WebDataset(str(tmp_path / "out" / shard["name"]), shardshuffle=False).decode():
            assert sorted(k for k in sample if not k.startswith("__")) == ["json", "mask.npy", "npy"]
            assert np.array_equal(sample["npy"], examples.ids(seen))
            assert np.array_equal(sample["mask.npy"], examples.loss_mask(seen))
            assert sample["json"]["prompt_tokens"] == examples.prompt_tokens[seen]
            assert sample["json"]["answer"] == examples.answers[seen] and sample["json"]["source"] == source
            seen += 1
    assert seen == 32 and len(manifest["splits"]["train"]["shards"]) > 1


def test_overwrite(tokenizer, tmp_path):
    source = write_lines(tmp_path / "a.jsonl", GOOD)
    out = tmp_path / "out"
    assert prepare_sft(tokenizer, out, source).returncode == 0
    one_line_error(prepare_sft(tokenizer, out, source, seq_len=96), "already exists; pass --overwrite")
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 80  # untouched
    done = prepare_sft(tokenizer, out, source, seq_len=96, extra=["--overwrite"])
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["seq_len"] == 96
    # in place: the tokenizer inside OUT is read before OUT is replaced
    done = prepare_sft(str(out / "tokenizer"), out, source, extra=["--overwrite"])
    assert done.returncode == 0, done.stderr
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # a folder that is not a prepared one is never replaced, even with --overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    one_line_error(prepare_sft(tokenizer, tmp_path / "mine", source, extra=["--overwrite"]), "not a prepared folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "mine", "out"]  # no staging left behind


LONG_PROMPT = {"prompt": "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3, "response": "ok"}


@pytest.mark.parametrize("lines, needles", [
    ([GOOD[0], '{"prompt": "x", "response": '], ["A.jsonl line 2: invalid JSON"]),
    ([GOOD[0], GOOD[1], {"text": "x"}], ["A.jsonl line 3:", 'neither "prompt"/"response" nor "messages"']),
    ([{"prompt": "x"}], ["A.jsonl line 1:", 'no "response"']),
    (["", {"prompt": "x", "response": "   "}], ["A.jsonl line 2:", "the response is empty"]),
    ([{"messages": [{"role": "user", "content": "x"}]}], ["A.jsonl line 1:", "not the assistant's"]),
    ([{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     ["A.jsonl line 1:", "message 0 has role 'bot'"]),
    ([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}],
     ["A.jsonl line 1:", "content of type int, not a string"]),
    ([GOOD[0], LONG_PROMPT], ["A.jsonl line 2: the prompt is ", "--seq-len 40 leaves no room for the response; "
                              "shorten it or raise --seq-len"]),
    ([], ["A.jsonl: holds no records"]),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tokenizer, tmp_path, lines, needles):
    source = write_lines(tmp_path / "A.jsonl", lines)
    out = tmp_path / "new" / "parent" / "out"
    done = gptscale("data", "prepare-sft", "--input", "A.jsonl", "--tokenizer", tokenizer, "--out", str(out),
                    "--seq-len", "40", cwd=tmp_path)
    one_line_error(done, *needles)
    assert os.listdir(tmp_path) == [os.path.basename(source)]  # not even the missing parents


def test_an_empty_validation_split_is_said(tokenizer, tmp_path):
    source = write_lines(tmp_path / "a.jsonl", GOOD[:2])
    done = prepare_sft(tokenizer, tmp_path / "out", source, extra=["--val-fraction", "0.01"])
    one_line_error(done, "--val-fraction 0.01 left no example for the validation split")
    assert not (tmp_path / "out").exists()
    one_line_error(prepare_sft(tokenizer, tmp_path / "out", source, extra=["--val-fraction", "0.01", "--val-input",
                                                                            source]), "not allowed with")


def test_help_documents_the_template():
    done = gptscale("data", "prepare-sft", "--help")
    assert done.returncode == 0
    assert "Assistant:<space>" in done.stdout and "chat_template" in done.stdout and "CONTENT[EOS]" in done.stdout
