"""Peak memory of checkpoint conversion, gptscale against DeepSpeed's zero_to_fp32 on the
same files, and of train.init_from's read on each rank.

1. Train a >= 400M-parameter GPT-2 (gpt2-350m with 28 layers, 405M) for one step at zero3
   DP=2 on 2 CPU ranks and save (fp32 master weights and Adam moments, partitioned in two).
2. Consolidate that checkpoint in a fresh process each, peak RSS from wait4():
   `gptscale convert consolidate` (memory-mapped reads, tensor by tensor) and DeepSpeed's
   own `zero_to_fp32.py` (the copy DeepSpeed writes beside its checkpoints) to safetensors.
   Both outputs are checked equal, tensor by tensor.
3. train.init_from at TP=2, what one rank keeps of the canonical file (its TP pieces): read
   piece by piece (gptscale now) against the previous way (safetensors' load_file of the
   whole file, split for every TP rank, one rank's part kept), each in a fresh process.

    .venv/bin/python bench/convert_memory.py [--layers 28] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "GPTSCALE_QUIET_SAVE": "1",
       "PYTHONPATH": str(ROOT)}


# Peak RSS is read from /proc/self/status (VmHWM) as the measured program exits: wait4's
# ru_maxrss would not do, Linux carries the parent's high-water mark over fork and exec.
MEASURED = """
import atexit, runpy, sys
def report():
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    sys.stderr.write(f"VmHWM_KiB {hwm}\\n")
atexit.register(report)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def peak_rss(args: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, output tail) of `python ARGS` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURED, *args], env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    hwm = [line for line in done.stderr.splitlines() if line.startswith("VmHWM_KiB")][-1]
    return int(hwm.split()[1]) / 1024, time.perf_counter() - started, (done.stdout + done.stderr)[-400:]


def train_rank(overrides):
    from gptscale import config
    from gptscale.train.loop import train

    train(config.load(None, overrides), resume="none")


def make_checkpoint(folder: Path, layers: int) -> Path:
    from gptscale.testing.distributed import run_ranks

    overrides = ["model.preset=gpt2-350m", f"model.n_layer={layers}", "data.synthetic=true", "data.seq_len=32",
                 f"train.out_dir={folder}", "train.steps=1", "train.micro_batch=1", "train.eval_every=0",
                 "train.sample_tokens=0", "train.progress=false", "train.tensorboard=false"]
    run_ranks(train_rank, 2, overrides, timeout=1800, env={k: ENV[k] for k in ("DS_ACCELERATOR", "GPTSCALE_QUIET_SAVE")})
    return folder / "checkpoints" / "step00000001"


READ_PIECES = """
import sys
from gptscale import config
from gptscale.checkpoint.convert import open_weights
from gptscale.checkpoint.weights import tp_piece
from gptscale.convert.tp import canonical_layout
cfg = config.load(sys.argv[1] + "/config.yaml")
source = open_weights(sys.argv[1], cfg.model)
shapes, table = canonical_layout(cfg.model)
kept = [tp_piece(source, n, table[n], 0, 2, cfg.model.padded_vocab_size(2)) for n in shapes]
print("kept_mib", sum(t.numel() * t.element_size() for t in kept) / 2**20)
"""
LOAD_FILE = """
import sys
from safetensors.torch import load_file
from gptscale import config
from gptscale.checkpoint.weights import tp_piece
from gptscale.convert.tp import canonical_layout, split_tp
cfg = config.load(sys.argv[1] + "/config.yaml")
shapes, table = canonical_layout(cfg.model)
weights = load_file(sys.argv[1] + "/model.safetensors")
kept = split_tp(weights, table, 2, cfg.model.padded_vocab_size(2))[0]
print("kept_mib", sum(t.numel() * t.element_size() for t in kept.values()) / 2**20)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="convert-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "run" / "checkpoints" / "step00000001"
    started = time.perf_counter()
    if not ckpt.is_dir():
        ckpt = make_checkpoint(work / "run", args.layers)
    print(f"checkpoint: {ckpt} ({time.perf_counter() - started:.0f} s)", flush=True)
    for old in ("ours", "theirs"):  # outputs of an earlier run in --keep
        shutil.rmtree(work / old, ignore_errors=True)

    import torch
    from safetensors import safe_open

    from gptscale.checkpoint.read import CheckpointReader

    reader = CheckpointReader(ckpt)
    params = sum(s.numel() for s in reader.shapes.values())
    largest = max(s.numel() for s in reader.shapes.values()) * 4 / 2**20
    weights_mib = params * 4 / 2**20
    files_mib = sum(p.stat().st_size for p in ckpt.glob("*.pt")) / 2**20
    # Baseline: the interpreter with torch, DeepSpeed and gptscale imported, nothing read.
    (work / "baseline.py").write_text("import torch, deepspeed, gptscale.checkpoint.read, gptscale.cli\n")
    base, _, _ = peak_rss([str(work / "baseline.py")])
    ours, ours_s, _ = peak_rss(["-m", "gptscale.cli", "convert", "consolidate", str(ckpt), str(work / "ours"),
                                "--quiet"])
    script = ckpt.parent / "zero_to_fp32.py"  # DeepSpeed's own, copied beside its checkpoints
    theirs, theirs_s, _ = peak_rss([str(script), str(ckpt.parent), str(work / "theirs"), "--tag", ckpt.name,
                                    "--safe_serialization"])
    # The same tensors (DeepSpeed's keep the vocabulary padding rows, which gptscale drops).
    files = sorted((work / "theirs").glob("*.safetensors"))
    mismatched = 0
    with safe_open(str(work / "ours" / "model.safetensors"), "pt") as mine:
        for file in files:
            with safe_open(str(file), "pt") as other:
                for name in other.keys():
                    a, b = mine.get_tensor(name), other.get_tensor(name)
                    mismatched += not torch.equal(a, b[:a.shape[0]])
    (work / "read_pieces.py").write_text(READ_PIECES)
    (work / "load_file.py").write_text(LOAD_FILE)
    pieces = peak_rss([str(work / "read_pieces.py"), str(work / "ours")])
    whole = peak_rss([str(work / "load_file.py"), str(work / "ours")])
    result = {
        "parameters": params, "fp32_weights_mib": round(weights_mib), "largest_tensor_mib": round(largest, 1),
        "checkpoint_files_mib": round(files_mib), "baseline_rss_mib": round(base),
        "gptscale_consolidate": {"peak_rss_mib": round(ours), "seconds": round(ours_s, 1)},
        "deepspeed_zero_to_fp32": {"peak_rss_mib": round(theirs), "seconds": round(theirs_s, 1)},
        "tensors_differing": mismatched,
        "init_from_tp_rank0_of_2": {"peak_rss_mib": round(pieces[0]), "note": pieces[2].strip()},
        "previous_init_from_load_file_split": {"peak_rss_mib": round(whole[0]), "note": whole[2].strip()},
    }
    print(json.dumps(result, indent=2))
    print(f"\nconsolidate peak RSS: gptscale {ours:.0f} MiB, zero_to_fp32 {theirs:.0f} MiB "
          f"(ratio {theirs / ours:.2f}); baseline {base:.0f} MiB, fp32 weights {weights_mib:.0f} MiB, "
          f"largest tensor {largest:.0f} MiB")


if __name__ == "__main__":
    main()
