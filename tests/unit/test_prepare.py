"""Tokenizer and shard writer: round trips, every input format, determinism, bad input."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from gptscale.errors import DataError
from gptscale.data.prepare import is_validation, prepare, split_pieces
from gptscale.data.shards import matching_tokenizer, read_manifest, split_urls
from gptscale.data.sources import ReadOptions, embedded_documents, read_documents
from gptscale.data.read import read_shard
from gptscale.data.tokenizer import TextTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [text for _, text in embedded_documents("pydoc")]
    return train_tokenizer(texts, 1024, tmp_path_factory.mktemp("tok"))


def shard_texts(folder, tokenizer, split="train"):
    manifest = read_manifest(folder)
    return [tokenizer.decode(d.tolist()) for url in split_urls(folder, split, manifest)
            for d in read_shard(url, manifest["tokenizer"]["vocab_size"])]


def test_round_trip_on_the_embedded_corpus(tokenizer):
    docs = list(embedded_documents("python"))
    sample = docs[:: max(1, len(docs) // 150)]  # every kind: English reference text and code
    assert len(sample) > 100
    for name, text in sample:
        assert tokenizer.decode(tokenizer.encode(text)) == text, name


def test_tokenizer_loads_in_transformers(tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(__import__("pathlib").Path(tokenizer.path).parent))
    text = "def f(x):\n    return x ** 2  # naïve café\n"
    assert hf.encode(text) == tokenizer.encode(text)
    assert hf.decode(hf.encode(text)) == text
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id)
    assert tokenizer.vocab_size == 1024


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="--vocab-size 100 is too small"):
        train_tokenizer(["abc"], 100, tmp_path)
    with pytest.raises(DataError, match="no tokenizer.json there"):
        TextTokenizer.load(tmp_path / "nothing")


def write_inputs(folder):
    """One small file of every supported kind; returns (specs, expected texts in read order)."""
    folder.mkdir()
    (folder / "a.txt").write_text("first text file\nwith two lines\n")
    (folder / "b.txt").write_text("line one\nline two\n\npara two\n")
    rows = [{"text": f"json line {i} ✓", "id": i} for i in range(3)]
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(folder / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gzipped body"}) + "\n")
    import zstandard
    (folder / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        (json.dumps({"text": "zstd text"}) + "\n").encode()))
    (folder / "f.json").write_text(json.dumps([{"text": "json list a"}, {"text": "json list b"}]))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), folder / "g.parquet")
    import datasets
    datasets.Dataset.from_dict({"text": ["saved dataset row"]}).save_to_disk(str(folder / "saved"))
    return folder


def test_every_input_format(tmp_path, tokenizer):
    inputs = write_inputs(tmp_path / "in")
    read = lambda specs, **kw: [d.text for d in read_documents(specs, ReadOptions(**kw))]  # noqa: E731
    assert read([str(inputs / "a.txt")]) == ["first text file\nwith two lines\n"]
    assert read([str(inputs / "b.txt")], txt_mode="line") == ["line one", "line two", "para two"]
    assert read([str(inputs / "b.txt")], txt_mode="paragraph") == ["line one\nline two", "para two"]
    assert read([str(inputs / "c.jsonl")]) == ["json line 0 ✓", "json line 1 ✓", "json line 2 ✓"]
    assert read([str(inputs / "d.jsonl.gz")], text_field="body") == ["gzipped body"]
    assert read([str(inputs / "e.jsonl.zst"), str(inputs / "f.json"), str(inputs / "g.parquet")]) == [
        "zstd text", "json list a", "json list b", "parquet one", "parquet two"]
    assert read([str(inputs / "saved")]) == ["saved dataset row"]
    assert read([f"hf:json:{inputs}/c.jsonl"]) == ["json line 0 ✓", "json line 1 ✓", "json line 2 ✓"]

    specs = [str(inputs / n) for n in ("a.txt", "c.jsonl", "e.jsonl.zst", "f.json", "g.parquet", "saved")]
    out = tmp_path / "shards"
    manifest = prepare(specs, tokenizer.path, out, val_fraction=0.0, workers=1, progress=False)
    expected = read(specs)
    assert shard_texts(out, tokenizer) == expected
    assert manifest["splits"]["train"]["documents"] == len(expected) == 10
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["sha256"] == tokenizer.sha256


def test_prepare_is_deterministic_and_splits_by_document(tmp_path, tokenizer):
    def run(name, workers):
        out = tmp_path / name
        prepare(["builtin:pydoc"], tokenizer.path, out, shard_bytes=64 << 10, val_fraction=0.1,
                workers=workers, progress=False)
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | {"m": (out / "manifest.json").read_bytes()}

    serial, parallel = run("one", 1), run("two", 2)
    assert serial == parallel  # byte-identical, whatever the number of tokenizer processes
    manifest = read_manifest(tmp_path / "one")
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["shards"]) > 3 and val["documents"] > 0
    assert train["documents"] + val["documents"] == len(list(embedded_documents("pydoc")))
    assert sorted(shard_texts(tmp_path / "one", tokenizer) + shard_texts(tmp_path / "one", tokenizer, "val")) == \
        sorted(text for _, text in embedded_documents("pydoc"))


def test_split_pieces_hold_out_chunks_by_hash_of_name_and_index():
    assert split_pieces("doc", 1000, 0.5) == [(0, 1000, is_validation("doc", 0.5))]  # val_chunk 0: whole
    held = total = 0
    for n in range(300):
        pieces = split_pieces(f"file{n}.py", 1000 + n, 0.1, val_chunk=64)
        # in order, no gap, no overlap, neighbours go different ways (same-way chunks stay one range)
        assert pieces[0][0] == 0 and pieces[-1][1] == 1000 + n
        assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(pieces, pieces[1:]))
        for i, start in enumerate(range(0, 1000 + n, 64)):
            (flag,) = [h for a, b, h in pieces if a <= start < b]
            assert flag == is_validation(f"file{n}.py#{i}", 0.1)
            held, total = held + flag, total + 1
    assert 0.08 < held / total < 0.12  # 4,800 chunks, 10% asked
    assert split_pieces("x", 100, 0.0, val_chunk=16) == [(0, 100, False)]


def test_prepare_with_val_chunk_holds_out_chunks_of_every_kind_of_document(tmp_path, tokenizer):
    whole = prepare(["builtin:pydoc"], tokenizer.path, tmp_path / "whole", val_fraction=0.0, workers=1,
                    progress=False)
    manifest = prepare(["builtin:pydoc"], tokenizer.path, tmp_path / "chunks", val_fraction=0.05, val_chunk=128,
                       workers=1, progress=False)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["val_chunk"] == 128 and whole["val_chunk"] == 0
    assert train["tokens"] + val["tokens"] == whole["splits"]["train"]["tokens"]  # every token, once
    assert 0.03 < val["tokens"] / (train["tokens"] + val["tokens"]) < 0.07
    pieces = {split: _pieces(tmp_path / "chunks", split) for split in ("train", "val")}
    held_from = {name.split("#")[0] for name, _ in pieces["val"]}
    by_document = sum(is_validation(f"builtin:pydoc:{name}", 0.05) for name, _ in embedded_documents("pydoc"))
    assert len(held_from) >= 4 * by_document  # from many documents (30 of 79), not a handful (6 whole ones)
    for name, tokens in pieces["val"]:  # whole documents, or ranges starting at a chunk boundary
        if "#" in name:
            start, end = map(int, name.rsplit("#", 1)[1].split(":"))
            assert start % 128 == 0 and end - start == len(tokens)
    # train and val together are the corpus: every document's tokens, in order, cut only where chunks were held out
    rebuilt: dict[str, list] = {}
    for name, tokens in sorted(pieces["train"] + pieces["val"],
                               key=lambda p: (p[0].split("#")[0], int(p[0].rsplit("#", 1)[1].split(":")[0])
                                              if "#" in p[0] else 0)):
        rebuilt.setdefault(name.split("#")[0], []).extend(tokens.tolist())
    expected = {f"builtin:pydoc:{name}": tokenizer.encode(text) for name, text in embedded_documents("pydoc")}
    assert rebuilt == expected


def _pieces(folder, split):
    """(name, token ids) of every document in a split's shards."""
    import io
    import tarfile

    out = []
    for url in split_urls(folder, split, read_manifest(folder)):
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({n.split(".")[0] for n in members}):
            out.append((json.loads(members[f"{key}.json"])["name"], np.load(io.BytesIO(members[f"{key}.npy"]))))
    return out


@pytest.mark.parametrize("content, options, message", [
    ('{"text": "ok"}\n{"txt": "no field"}\n', {}, r"bad.jsonl:2: no 'text' field \(found \['txt'\]\)"),
    ('{"text": "ok"}\n{"text": "   "}\n', {}, r"bad.jsonl:2: empty document"),
    ('{"text": "ok"}\n{not json\n', {}, r"bad.jsonl:2: invalid JSON"),
    ('{"text": 5}\n', {}, r"bad.jsonl:1: field 'text' is a int, not a string"),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer, content, options, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare([str(bad)], tokenizer.path, tmp_path / "out", workers=1, progress=False)
    assert not list((tmp_path / "out").glob("*.tar*")) and not (tmp_path / "out" / "manifest.json").exists()


def test_skipping_bad_records_is_counted(tmp_path, tokenizer, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "kept"}\n{"txt": "x"}\n{"text": ""}\n{"text": "kept too"}\n')
    manifest = prepare([str(bad)], tokenizer.path, tmp_path / "out", workers=1, progress=False,
                       val_fraction=0.0, options=ReadOptions(on_bad="skip"))
    assert manifest["skipped"] == {str(bad): 2}
    assert shard_texts(tmp_path / "out", tokenizer) == ["kept", "kept too"]
    assert "warning:" in capsys.readouterr().err


def test_non_utf8_input_is_named(tmp_path, tokenizer):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not valid UTF-8"):
        prepare([str(bad)], tokenizer.path, tmp_path / "out", workers=1, progress=False)


def test_an_interrupted_prepare_leaves_no_usable_folder(tmp_path, tokenizer):
    good = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(200))
    bad = tmp_path / "late-error.jsonl"
    bad.write_text(good + '{"oops": 1}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match="late-error.jsonl:201"):
        prepare([str(bad)], tokenizer.path, out, shard_bytes=8 << 10, workers=1, progress=False)
    assert list(out.glob("*.tar")), "finished shards stay (they are complete files)"
    assert not list(out.glob("*.tmp-*")), "no half-written file remains"
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(out)
    with pytest.raises(DataError, match="already holds shards"):
        prepare([str(tmp_path / "late-error.jsonl")], tokenizer.path, out, workers=1, progress=False)


def test_a_different_tokenizer_is_refused(tmp_path, tokenizer):
    out = tmp_path / "out"
    prepare(["builtin:pydoc"], tokenizer.path, out, workers=1, progress=False)
    assert matching_tokenizer(out, read_manifest(out)).sha256 == tokenizer.sha256
    other = train_tokenizer(["some other text entirely"] * 10, 300, tmp_path / "other")
    with pytest.raises(DataError, match="is not the one the shards in .* were made with"):
        matching_tokenizer(out, read_manifest(out), other.path)


def test_cli_prepare_and_inspect(tmp_path, tokenizer):
    run = lambda *a: subprocess.run([sys.executable, "-m", "gptscale.cli", "data", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = tmp_path / "cli"
    done = run("prepare", "--input", "builtin:pydoc", "--tokenizer", str(__import__("pathlib").Path(tokenizer.path).parent),
               "--out", str(out), "--workers", "2", "--shard-size", "100KB", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "train:" in done.stdout and "manifest:" in done.stdout
    shown = run("inspect", str(out), "--tokens", "20")
    assert shown.returncode == 0 and "documents" in shown.stdout and "first document" in shown.stdout
    missing = run("inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("gptscale: error: ") and "no manifest" in missing.stderr
    assert np.dtype(read_manifest(out)["dtype"]) == np.uint16
