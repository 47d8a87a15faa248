"""`gptscale data inspect DIR`: what a prepared folder holds, and one document decoded."""
from __future__ import annotations

from pathlib import Path

from gptscale.data.shards import matching_tokenizer, read_manifest, split_urls
from gptscale.data.stream import read_shard


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
    urls = split_urls(folder, "train", manifest)
    first = read_shard(urls[0], tok["vocab_size"])[0]
    lines.append(f"\nfirst document of {Path(urls[0]).name} ({first.size} tokens), first {sample_tokens} decoded:")
    lines.append(tokenizer.decode(first[:sample_tokens].tolist()))
    return "\n".join(lines)
