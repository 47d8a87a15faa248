"""Fine-tuning records for the demo: "what does this line define?" over the embedded Python corpus.

Each record's prompt is a line of Python that defines something; its response is one word
in a fixed vocabulary: `class` (`class Parser(Base):`), `method` (a def whose first
parameter is self or cls) or `function` (any other def). The pretrained demo model has
never seen the format, so it answers almost none; the held-out records' names never occur
in the training records, so a fine-tuned model must read the line, not remember it.

    python examples/sft_records.py OUT_DIR   ->  OUT_DIR/train.jsonl, OUT_DIR/val.jsonl
"""
from __future__ import annotations

import json
import re
import sys
import zlib
from pathlib import Path

from gptscale.data.sources import embedded_documents

DEFINITION = re.compile(r"\s*(?:async\s+)?(def|class)\s+([A-Za-z_][A-Za-z0-9_]*)\s*([(:])\s*(\w*)")


def kind(match: re.Match) -> str:
    if match.group(1) == "class":
        return "class"
    return "method" if match.group(3) == "(" and match.group(4) in ("self", "cls") else "function"


def records() -> list[dict]:
    seen, out = set(), []
    for _, text in embedded_documents("python"):
        for line in text.splitlines():
            match = DEFINITION.match(line)
            line = line.strip()
            if match and len(line) <= 80 and line not in seen:
                seen.add(line)
                out.append({"prompt": line, "response": kind(match), "name": match.group(2)})
    return out


def main(out_dir: str, val_count: int = 300) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = records()
    # Held out by name, so no validation name is ever seen in training.
    held_out = {r["name"] for r in rows if zlib.crc32(r["name"].encode()) % 10 == 0}
    train = [r for r in rows if r["name"] not in held_out]
    # As many held-out records of each kind: always answering the commonest kind scores 1/3.
    kinds = sorted({r["response"] for r in rows})
    val = [r for k in kinds for r in [r for r in rows if r["name"] in held_out and r["response"] == k][:val_count // 3]]
    val.sort(key=lambda r: zlib.crc32(r["prompt"].encode()))
    for name, split in (("train", train), ("val", val)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in split:
                f.write(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n")
    print(f"{len(train)} training and {len(val)} held-out records in {out}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
