"""What every launch test checks: both ranks trained together and saved."""
import json
from pathlib import Path


def assert_two_ranks_trained(run_dir: Path, output: str, launcher: str, steps: int = 3) -> None:
    ckpt = run_dir / "checkpoints" / f"step{steps:08d}"
    assert (ckpt / "COMPLETE.json").is_file(), output[-4000:]
    layout = json.loads((ckpt / "COMPLETE.json").read_text())["layout"]
    assert (layout["tp"], layout["pp"], layout["dp"]) == (1, 1, 2), layout  # one DP group of two ranks
    assert (ckpt / "gptscale_rank00000.safetensors").is_file() and (ckpt / "gptscale_rank00001.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert f"gptscale train: {launcher}: rank 0 of 2" in output, output[-4000:]
