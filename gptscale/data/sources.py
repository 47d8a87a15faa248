"""Documents from local inputs: text, JSON lines / JSON, Parquet, Hugging Face datasets, and
the embedded corpus that every Python installation carries.

An input spec is one of:
    builtin:pydoc | builtin:stdlib | builtin:python   the embedded corpus (see embedded_documents)
    hf:BUILDER:FILES                                  datasets.load_dataset(BUILDER, data_files=FILES), offline
    DIR saved by datasets' save_to_disk               datasets.load_from_disk(DIR)
    DIR                                               every supported file below it, in sorted order
    FILE or GLOB                                      .txt  .jsonl  .json  .parquet  (+ .gz / .zst for text)

Every bad record raises DataError naming file and line, unless the caller asked for
`on_bad="skip"`, in which case it is counted and warned about once per file.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gptscale.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
COMPRESSIONS = ("", ".gz", ".zst")
SUPPORTED = tuple(s + c for s in TEXT_SUFFIXES for c in COMPRESSIONS) + (".parquet",)


@dataclass(frozen=True)
class Document:
    source: str  # the input it came from: a file, builtin:NAME, hf:...
    index: int  # position within that source
    name: str  # stable name of the record (file:line, file[row N], builtin:stdlib:stdlib/os.py)
    text: str


@dataclass
class ReadOptions:
    text_field: str = "text"
    txt_mode: str = "file"  # file: one document per .txt file; line: per line; paragraph: per blank-line block
    on_bad: str = "error"  # error | skip
    skipped: dict[str, int] = field(default_factory=dict)  # source -> number of records skipped

    def __post_init__(self) -> None:
        if self.txt_mode not in ("file", "line", "paragraph"):
            raise DataError(f"--txt-mode {self.txt_mode!r} is unknown; choose file, line or paragraph")
        if self.on_bad not in ("error", "skip"):
            raise DataError(f"--on-bad {self.on_bad!r} is unknown; choose error or skip")

    def bad(self, where: str, source: str, problem: str) -> None:
        """Raise for a bad record, or count it when skipping was asked for."""
        if self.on_bad == "error":
            raise DataError(f"{where}: {problem} (pass --on-bad skip to skip such records with a warning)")
        if source not in self.skipped:
            print(f"warning: {where}: {problem}; skipping (further skips in this file are only counted)",
                  file=sys.stderr)
        self.skipped[source] = self.skipped.get(source, 0) + 1


def read_documents(specs: list[str], options: ReadOptions) -> Iterator[Document]:
    """All documents of all inputs, in a deterministic order (specs in order, files sorted)."""
    for spec in specs:
        for source, texts in _expand(spec, options):
            index = 0
            for where, text in texts:
                if not text.strip():
                    options.bad(where, source, "empty document")
                    continue
                yield Document(source, index, where, text)
                index += 1


def _expand(spec: str, options: ReadOptions) -> Iterator[tuple[str, Iterator[tuple[str, str]]]]:
    if spec.startswith("builtin:"):
        yield spec, ((f"{spec}:{name}", text) for name, text in embedded_documents(spec.removeprefix("builtin:")))
        return
    if spec.startswith("hf:"):
        yield spec, _hf_load_dataset(spec, options)
        return
    path = Path(spec)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        yield spec, _hf_load_from_disk(path, options)
        return
    files = _files_for(spec)
    for file in files:
        yield str(file), _read_file(file, options)


def _files_for(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUPPORTED))
        if not files:
            raise DataError(f"input {spec!r}: no {', '.join(SUPPORTED)} files below this folder")
        return files
    if path.is_file():
        if not path.name.endswith(SUPPORTED):
            raise DataError(f"input {spec!r}: unsupported file type; use one of {', '.join(SUPPORTED)}")
        return [path]
    matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not matches:
        raise DataError(f"input {spec!r} does not exist (no file, folder or glob match)")
    return [p for p in matches if p.name.endswith(SUPPORTED)]


def open_text(file: Path) -> io.TextIOBase:
    raw: io.BufferedIOBase
    if file.name.endswith(".gz"):
        raw = gzip.open(file, "rb")
    elif file.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(file, "rb"), closefd=True)
    else:
        raw = open(file, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _read_file(file: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    name = file.name.removesuffix(".gz").removesuffix(".zst")
    try:
        if name.endswith(".parquet"):
            yield from _read_parquet(file, options)
        elif name.endswith(".jsonl"):
            yield from _read_jsonl(file, options)
        elif name.endswith(".json"):
            yield from _read_json(file, options)
        else:
            yield from _read_txt(file, options)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not valid UTF-8 near byte {exc.start} of a read block; "
                        f"re-encode the file as UTF-8") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{file}: cannot be read ({exc}); is it truncated or corrupt?") from None


def _read_txt(file: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    with open_text(file) as f:
        if options.txt_mode == "file":
            yield str(file), f.read()
        elif options.txt_mode == "line":
            for number, line in enumerate(f, 1):
                if line.strip():  # blank lines separate documents; they are not empty documents
                    yield f"{file}:{number}", line.rstrip("\n")
        else:
            block, start = [], 1
            for number, line in enumerate(f, 1):
                if line.strip():
                    block.append(line)
                elif block:
                    yield f"{file}:{start}", "".join(block).rstrip("\n")
                    block = []
                if not block:
                    start = number + 1
            if block:
                yield f"{file}:{start}", "".join(block).rstrip("\n")


def _text_of(record: object, where: str, source: str, options: ReadOptions) -> str | None:
    if not isinstance(record, dict) or options.text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        options.bad(where, source, f"no {options.text_field!r} field (found {keys}); choose it with --text-field")
        return None
    text = record[options.text_field]
    if not isinstance(text, str):
        options.bad(where, source, f"field {options.text_field!r} is a {type(text).__name__}, not a string")
        return None
    return text


def _read_jsonl(file: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    with open_text(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                options.bad(where, str(file), f"invalid JSON ({exc.msg})")
                continue
            text = _text_of(record, where, str(file), options)
            if text is not None:
                yield where, text


def _read_json(file: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    with open_text(file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg}); a .json input holds one list of "
                            f"records (use .jsonl for one record per line)") from None
    records = data if isinstance(data, list) else [data]
    for number, record in enumerate(records):
        where = f"{file}[{number}]"
        text = _text_of(record, where, str(file), options)
        if text is not None:
            yield where, text


def _read_parquet(file: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
    if options.text_field not in table.schema_arrow.names:
        raise DataError(f"{file}: no column {options.text_field!r} (columns: {table.schema_arrow.names}); "
                        f"choose it with --text-field")
    row = 0
    for batch in table.iter_batches(columns=[options.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{file}[row {row}]"
            row += 1
            if not isinstance(text, str):
                options.bad(where, str(file), f"column {options.text_field!r} is {text!r}, not a string")
                continue
            yield where, text


def _rows_of(dataset, name: str, options: ReadOptions) -> Iterator[tuple[str, str]]:
    if options.text_field not in dataset.column_names:
        raise DataError(f"{name}: no column {options.text_field!r} (columns: {dataset.column_names}); "
                        f"choose it with --text-field")
    texts = (text for batch in dataset.iter(batch_size=1024) for text in batch[options.text_field])
    for row, text in enumerate(texts):
        where = f"{name}[row {row}]"
        if not isinstance(text, str):
            options.bad(where, name, f"column {options.text_field!r} is {text!r}, not a string")
            continue
        yield where, text


def _hf_load_from_disk(path: Path, options: ReadOptions) -> Iterator[tuple[str, str]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        for split in sorted(loaded):
            yield from _rows_of(loaded[split], f"{path}:{split}", options)
    else:
        yield from _rows_of(loaded, str(path), options)


def _hf_load_dataset(spec: str, options: ReadOptions) -> Iterator[tuple[str, str]]:
    _, _, rest = spec.partition(":")
    builder, sep, files = rest.partition(":")
    if not sep or not builder or not files:
        raise DataError(f"input {spec!r}: write hf:BUILDER:FILES, e.g. hf:json:data/*.jsonl or hf:csv:table.csv")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach a hub
    import datasets

    matches = sorted(glob.glob(files, recursive=True))
    if not matches:
        raise DataError(f"input {spec!r}: no file matches {files!r}")
    dataset = datasets.load_dataset(builder, data_files=matches, split="train")
    yield from _rows_of(dataset, spec, options)


# -- the embedded corpus ------------------------------------------------------------------

def embedded_documents(name: str) -> Iterator[tuple[str, str]]:
    """Real text nobody here wrote, present in every CPython installation, as (name, text).

    pydoc:  the English reference documentation behind help() (pydoc_data.topics), one
            document per topic, ~0.5 MB
    stdlib: the standard library's own .py sources (tests, codec tables and site-packages
            excluded), one document per file, ~11 MB
    python: both
    """
    if name not in ("pydoc", "stdlib", "python"):
        raise DataError(f"input 'builtin:{name}' is unknown; choose builtin:pydoc, builtin:stdlib or builtin:python")
    if name in ("pydoc", "python"):
        from pydoc_data.topics import topics

        for topic in sorted(topics):
            yield f"pydoc/{topic}", topics[topic]
    if name in ("stdlib", "python"):
        root = Path(sysconfig.get_paths()["stdlib"])
        # encodings/ holds generated codec tables (hex literals and Unicode names), not code a
        # person wrote; a small model would spend its capacity memorising them.
        skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "encodings"}
        for file in sorted(root.rglob("*.py")):
            rel = file.relative_to(root)
            if skip.intersection(rel.parts):
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a handful of files are deliberately not UTF-8; they are not our input
            if text.strip():  # many __init__.py files are empty
                yield f"stdlib/{rel.as_posix()}", text
