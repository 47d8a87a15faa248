"""`gptscale data inspect DIR`: what a prepared folder holds, and one document decoded."""
from __future__ import annotations

from pathlib import Path

from gptscale.data.shards import MANIFEST, matching_tokenizer, read_manifest, shard_checks
from gptscale.data.read import read_shard
from gptscale.errors import DataError


def describe(folder: str | Path, tokenizer_path: str | None = None, sample_tokens: int = 200) -> str:
    manifest = read_manifest(folder)
    tokenizer = matching_tokenizer(folder, manifest, tokenizer_path)
    tok = manifest["tokenizer"]
    lines = [f"{folder}: {manifest['dtype']} token ids, vocab {tok['vocab_size']}, eos id {tok['eos_id']}, "
             f"tokenizer sha256 {tok['sha256'][:16]}...",
             f"sources: {', '.join(manifest['sources'])} ({manifest['text_bytes'] / 1e6:.1f} MB of text)"]
    if manifest.get("skipped"):
        lines.append(f"skipped records: {manifest['skipped']}")
    for split, info in manifest["splits"].items():
        shards = info["shards"]
        sizes = [s["tokens"] for s in shards] or [0]
        lines.append(f"{split:>5}: {info['documents']:,} documents, {info['tokens']:,} tokens in {len(shards)} shards "
                     f"(tokens per shard min {min(sizes):,} / max {max(sizes):,})")
    shards = shard_checks(folder, "train", manifest)
    documents = read_shard(shards[0][0], tok["vocab_size"], shards[0][1]) if shards else []
    if not documents:
        raise DataError(f"{Path(folder) / MANIFEST}: the train split holds no documents to show")
    path, first = shards[0][0], documents[0]
    lines.append(f"\nfirst document of {Path(path).name} ({first.size} tokens), first {sample_tokens} decoded:")
    lines.append(tokenizer.decode(first[:sample_tokens].tolist()))
    return "\n".join(lines)
