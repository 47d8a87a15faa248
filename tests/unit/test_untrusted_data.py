"""Data folders as they arrive from elsewhere: a manifest or shard written by someone else
must not run commands, read outside its folder, train silently on flipped bits, exhaust
memory or wrap token ids; preparing a folder in place must not destroy it.
Most go through the CLI, as a user would run them (one line, exit code 2)."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from gptscale.data.prepare import prepare
from gptscale.data.shards import MANIFEST, npy_bytes, read_manifest, split_urls
from gptscale.data.sources import embedded_documents
from gptscale.data.read import read_shard
from gptscale.data.stream import Corpus, StreamingLoader, StreamSpec, corpus_from
from gptscale.data.tokenizer import train_tokenizer
from gptscale.errors import DataError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def gptscale(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "gptscale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, "PYTHONPATH": os.getcwd()}, cwd=cwd)


def one_line_error(done, *needles):
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptscale: error:") and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer([text for _, text in embedded_documents("pydoc")], 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def folder(tmp_path, tokenizer):
    out = tmp_path / "data"
    prepare(["builtin:pydoc"], tokenizer.path, out, shard_bytes=64 << 10, val_fraction=0.05, workers=1,
            progress=False)
    return out


def _rewrite_manifest(folder, edit):
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _tar(path, members):
    """A tar of (name, payload, size the header claims or None); a claim beyond the payload
    writes the header alone, as a crafted shard would."""
    with open(path, "wb") as f:
        for name, payload, size in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload) if size is None else size
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            if size is None:
                f.write(payload + b"\0" * (-len(payload) % 512))
        f.write(b"\0" * 1024)


# -- 7: preparing in place ----------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_preparing_a_folder_again_in_place_keeps_its_tokenizer(folder):
    before = read_manifest(folder)
    done = gptscale("data", "prepare", "--input", "builtin:pydoc", "--tokenizer", str(folder / "tokenizer"),
                    "--out", str(folder), "--overwrite", "--workers", "2", "--shard-size", "64KB", "--val-fraction", "0.05",
                    "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    after = read_manifest(folder)
    assert after["tokenizer"]["sha256"] == before["tokenizer"]["sha256"]
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    assert after["splits"]["train"]["documents"] == before["splits"]["train"]["documents"]
    # The tokenizer's own folder as --out (its parent holds no shards): the tokenizer survives too.
    parent = folder.parent / "tok_parent"
    (parent / "tokenizer").mkdir(parents=True)
    for f in (folder / "tokenizer").iterdir():
        (parent / "tokenizer" / f.name).write_bytes(f.read_bytes())
    done = gptscale("data", "prepare", "--input", "builtin:pydoc", "--tokenizer", str(parent / "tokenizer"),
                    "--out", str(parent), "--workers", "2", "--shard-size", "64KB", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_manifest(parent)["tokenizer"]["sha256"] == before["tokenizer"]["sha256"]


# -- 8: names in a manifest or a shard ----------------------------------------------------------

def test_a_manifest_shard_name_cannot_run_a_command(folder, tmp_path):
    proof = tmp_path / "pwned"
    name = f"pipe:touch {proof}"
    (folder / name.replace("/", "_")).write_text("decoy")
    decoy = folder / name  # the literal name exists as a file, as the attack needs
    decoy.parent.mkdir(parents=True, exist_ok=True)
    decoy.write_text("decoy")
    _rewrite_manifest(folder, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    done = gptscale("data", "inspect", ".", cwd=folder)
    one_line_error(done, "manifest", "shard name")
    assert not proof.exists()


@pytest.mark.parametrize("name", ["../elsewhere.tar", "/etc/passwd", "sub/dir.tar", "train-000000.tar\n"])
def test_a_manifest_shard_name_cannot_leave_the_folder(folder, name):
    _rewrite_manifest(folder, lambda m: m["splits"]["train"]["shards"][0].update(name=name))
    with pytest.raises(DataError, match="shard name"):
        split_urls(folder, "train")


@pytest.mark.parametrize("member", ["../evil.npy", "/abs/evil2.npy", "0000000000.pyd", "000000000x.npy"])
def test_a_shard_member_outside_the_pattern_is_refused(tmp_path, member):
    shard = tmp_path / "train-000000.tar"
    _tar(shard, [(member, npy_bytes(np.array([5, 6, 7], dtype=np.uint16)), None)])
    with pytest.raises(DataError, match="member"):
        read_shard(str(shard), 100)


# -- 9: content, ids, sizes -----------------------------------------------------------------------

def test_a_bit_flipped_shard_is_caught(folder):
    shard = folder / read_manifest(folder)["splits"]["train"]["shards"][0]["name"]
    raw = bytearray(shard.read_bytes())
    start = raw.index(b"\x93NUMPY")  # the first document's .npy
    raw[start + 130] ^= 0x01  # one bit of one token id: the archive still reads
    shard.write_bytes(bytes(raw))
    done = gptscale("data", "inspect", str(folder))
    one_line_error(done, shard.name, "sha256")


def test_resume_is_keyed_on_content_not_on_the_path(folder, tmp_path, tokenizer):
    spec = StreamSpec(seq_len=16, vocab_size=300, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=3)
    loader = StreamingLoader([corpus_from(str(folder), "train")], spec, micro_batch=2)
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    expected = next(batches)
    # The same folder under another path (moved to local disk, a symlink): resumes.
    link = tmp_path / "elsewhere"
    link.symlink_to(folder)
    moved = StreamingLoader([corpus_from(str(link), "train")], spec, micro_batch=2)
    moved.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(next(iter(moved)), expected))
    # The same path re-prepared with other documents: refused.
    prepare(["builtin:stdlib"], tokenizer.path, folder, shard_bytes=64 << 10, workers=1, progress=False,
            overwrite=True)
    again = StreamingLoader([corpus_from(str(folder), "train")], spec, micro_batch=2)
    with pytest.raises(DataError, match="other corpora|other shards"):
        again.load_state_dict(state)


def test_token_ids_above_65535_are_stored_without_wrapping(tmp_path):
    """A tokenizer whose ids are not contiguous: 3 tokens, the largest id 70000."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|eos|>": 0, "hello": 1, "world": 70000}, unk_token="<|eos|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>", "bos_token": None,
                                                                         "pad_token": None}))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "hello world hello"}) + "\n")
    manifest = prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "tok"), tmp_path / "out", workers=1,
                       progress=False, val_fraction=0.0)
    assert manifest["tokenizer"]["vocab_size"] == 70001 and manifest["dtype"] == "uint32"
    urls = split_urls(tmp_path / "out", "train")
    assert [d.tolist() for d in read_shard(urls[0], 70001)] == [[1, 70000, 1]]


def test_a_huge_member_is_refused_before_it_is_read(tmp_path):
    shard = tmp_path / "train-000000.tar"
    # The header claims 2 GB; nothing follows. Reading it would need the memory first.
    _tar(shard, [("0000000000.npy", b"", 2 << 30)])
    with pytest.raises(DataError, match="0000000000.npy.*bytes"):
        read_shard(str(shard), 100)


def test_metadata_nested_too_deep_is_one_error(tmp_path):
    shard = tmp_path / "train-000000.tar"
    deep = b"[" * 200_000 + b"]" * 200_000
    _tar(shard, [("0000000000.npy", npy_bytes(np.array([5], dtype=np.uint16)), None), ("0000000000.json", deep, None)])
    with pytest.raises(DataError, match="0000000000.json"):
        read_shard(str(shard), 100)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["splits"]["train"].pop("shards"), "shards"),
    (lambda m: m.pop("splits"), "splits"),
    (lambda m: m["tokenizer"].update(folder="../../tok"), "tokenizer"),
    (lambda m: m["tokenizer"].update(vocab_size="many"), "vocab_size"),
    (lambda m: m["splits"]["train"]["shards"][0].update(sha256=7), "sha256"),
    (lambda m: m["tokenizer"].update(eos_id=10 ** 6), "eos_id"),
    (lambda m: m.pop("sources"), "sources"),
    (lambda m: m["splits"]["train"]["shards"][0].update(bytes=1), "bytes"),
])
def test_a_malformed_manifest_is_one_error(folder, edit, needle):
    _rewrite_manifest(folder, edit)
    one_line_error(gptscale("data", "inspect", str(folder)), MANIFEST, needle)


def test_a_corpus_from_explicit_urls_still_reads_pipes_and_plain_files(folder):
    """What a user passes to the loader explicitly (not a manifest) keeps its meaning."""
    local = split_urls(folder, "train")[0]
    assert [d.tolist() for d in read_shard(f"pipe:cat {local}", 300)] == [d.tolist() for d in read_shard(local, 300)]
    assert Corpus((local,)).urls == (local,)


def test_a_npy_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
    shard = tmp_path / "train-000000.tar"
    payload = npy_bytes(np.array([5, 6], dtype=np.uint32)).replace(b"(2,)", b"(1099511627776,)")
    _tar(shard, [("0000000000.npy", payload, None)])
    with pytest.raises(DataError, match="declares 1,099,511,627,776 uint32 ids"):
        read_shard(str(shard), 100)


def test_a_bad_shard_read_by_a_loader_worker_is_one_line(folder, tokenizer):
    shard = folder / read_manifest(folder)["splits"]["train"]["shards"][0]["name"]
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b"\x93NUMPY") + 130] ^= 0x01
    shard.write_bytes(bytes(raw))
    spec = StreamSpec(seq_len=16, vocab_size=300, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=3,
                      shuffle_shards=0)
    loader = StreamingLoader([corpus_from(str(folder), "train")], spec, micro_batch=2, num_workers=1)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert "\n" not in str(err.value) and shard.name in str(err.value) and "sha256" in str(err.value)
