"""The GPU check, for a session lent a GPU (run through bench/gpu_check.sh; never in CI).

Prints one table (issue 18 item 5):
1. GPT-2 124M and the Llama 1.2B shape, bf16, seq 2048, activation recompute none and
   selective: tokens/s and MFU of (a) the bare model loop and (b) `gptscale train` (ZeRO-3,
   bf16, 1 GPU, synthetic data, the CLI in a subprocess), and train / bare.
2. gptscale GPT vs transformers' GPT2LMHeadModel in the same bare loop at 8 x 1024 (the
   reference number of earlier runs, whose transformers model used its Python gelu_new: 1.60x).
3. bf16 vs fp32 parity of `gptscale train` (no test in tests/ compares the two, so it is here).
4. While the time budget lasts: a torch.profiler summary (GPU-busy fraction, host syncs and
   DtoH copies per step) of 3 trainer steps and 3 bare steps, written to $OUT/gpu_profile.json;
   `gptscale train` with every parameter ZeRO-3-persistent (no gathers at one rank), and with
   model.compile=true.
A row that fails reads FAILED with its last error line; the table is printed regardless.
`--cpu-smoke` (or `--dry-run`) runs the same code paths on the CPU with tiny shapes.

What still differs between the bare loop and the trainer at the same micro-batch and seq:
the bare loop keeps bf16 weights, gradients and AdamW states (torch fused AdamW), with no
fp32 master weights or fp32 gradient accumulation; it has no ZeRO-3 hooks or gathers, no
per-step host syncs (loss.item(), the non-finite checks, the grad norm) and no logging. Both
clip gradients at 1.0. MFU counts model FLOPs only (6N + attention), never recomputed ones.

Time budget on one H200 (the whole run must stay under 8 minutes):
- imports and CUDA start-up                                                     ~10 s
- bare loops: 124M 3 + 20 steps x 16,384 tokens at ~250k tok/s = 1.5 s; 1.2B 3 + 10 steps
  x 8,192 tokens at ~50k tok/s = 2.1 s; ~3 s to build each model; 4 runs         ~20 s
- trainer: 124M 25 steps x 16,384 tokens at 5x slower (50k tok/s) = 8 s, 1.2B 15 steps x
  8,192 at 10k tok/s = 12 s; start-up ~25 s (124M) / ~40 s (1.2B: zero.Init and the
  optimizer of 1.2B parameters); DeepSpeed's fused Adam JIT build once, ~60 s:
  2 x 33 + 2 x 52 + 60                                                          ~230 s
- transformers pair: 2 x 13 steps x 8,192 tokens at >= 190k tok/s + builds       ~10 s
- parity: two 124M runs side by side, seq 256, 40 steps of 2,048 tokens         ~35 s
  required total                                                               ~305 s
- profile: one 124M trainer run of 10 steps (3 profiled) + 3 bare steps          ~45 s
- variants of the 124M trainer, each started only with >= 100 s of the 450 s budget left:
  every parameter ZeRO-3-persistent (~35 s), then model.compile=true         <= 100 s
So <= 450 s (7.5 min) here, plus gpu_check.sh's wheel install (~10 s): under 8 minutes.
Memory: 124M at 8 x 2048 ~16 GB; 1.2B at 4 x 2048 ~45 GB in the trainer (weights, fp32
masters, Adam, fp32 gradients ~25 GB; activations and fp32 logits over 128k words ~20 GB).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = bool({"--cpu-smoke", "--dry-run"} & set(sys.argv[1:]))
if SMOKE:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports DeepSpeed; the trainers inherit it
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gpu_check_profile import profile_steps, short, sync  # noqa: E402
from run import hf_model  # noqa: E402 - bench/run.py: the transformers peer
from gptscale import config  # noqa: E402
from gptscale.model.counting import flops_per_token  # noqa: E402
from gptscale.model.gpt import GPT  # noqa: E402
from gptscale.scaling.hardware import device_peak_tflops  # noqa: E402

# bf16 keeps 8 mantissa bits (0.4% per rounding); with fp32 master weights and an fp32 loss the
# bf16 and fp32 loss curves of a short run stay within ~1%, so 3% per step (relative to fp32)
# leaves room for the runs drifting apart while the loss falls fast, and still catches a broken
# cast, overflow or a non-finite step. (Not calibrated on a GPU yet; on the CPU the tiny model
# barely learns in 20 steps and the two agree to 0.002%.)
PARITY_REL_TOL = 0.03


@dataclass(frozen=True)
class Shape:
    label: str
    preset: str
    micro_batch: int
    bare_steps: int  # timed, after BARE_WARMUP
    train_steps: int  # in all; the first Plan.train_warmup are left out of tokens/s


@dataclass(frozen=True)
class Plan:
    device: str
    precision: str  # train.precision, and the bare loop's weight dtype
    seq: int
    shapes: tuple[Shape, ...]
    recompute: tuple[str, ...]
    train_warmup: int
    hf: tuple[str, int, int, int]  # preset, batch, seq, timed steps
    parity: tuple[str, int, int, int, tuple[str, str]]  # preset, seq, micro_batch, steps, precisions
    profile: tuple[int, int, int]  # trainer steps in all, first profiled step (0-based), profiled steps
    budget_s: float
    variant_needs_s: float  # start a variant row (persistent, compile) only with this much budget left


GPU = Plan(device="cuda", precision="bf16", seq=2048,
           shapes=(Shape("GPT-2 124M", "gpt2-124m", 8, 20, 25), Shape("Llama 1.2B", "llama-1b", 4, 10, 15)),
           recompute=("none", "selective"), train_warmup=5, hf=("gpt2-124m", 8, 1024, 10),
           parity=("gpt2-124m", 256, 8, 40, ("bf16", "fp32")), profile=(10, 5, 3), budget_s=450.0,
           variant_needs_s=100.0)
# Same paths on 2 CPU cores: tiny shapes, fp32 (CPU bf16 matmuls are slow), no fused Adam.
CPU = Plan(device="cpu", precision="fp32", seq=64,
           shapes=(Shape("tiny (gpt2)", "tiny", 2, 2, 3), Shape("tiny-llama", "tiny-llama", 2, 2, 3)),
           recompute=("none", "selective"), train_warmup=1, hf=("tiny", 2, 64, 2),
           parity=("tiny", 64, 2, 3, ("bf16", "fp32")), profile=(4, 1, 2), budget_s=900.0, variant_needs_s=60.0)
BARE_WARMUP = 3
ROWS: list[tuple[str, str]] = []
LIVE: list["TrainRun"] = []  # stopped at the end whatever happens: no trainer outlives the check
STARTED = time.monotonic()


def remaining(plan: Plan) -> float:
    return plan.budget_s - (time.monotonic() - STARTED)


def last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "rror" in line or "Killed" in line or "Exception" in line]
    return ((errors or lines or ["?"])[-1])[:300]


def attempt(name: str, fn, *args):
    """Run one row's measurement; a failure becomes a FAILED row, never the end of the table."""
    try:
        value, text = fn(*args)
    except Exception as err:
        traceback.print_exc()
        text, value = f"FAILED: {last_error_line(f'{type(err).__name__}: {err}')}", None
        free_memory()
    ROWS.append((name, text))
    print(f"[{time.monotonic() - STARTED:.0f} s] {name}: {text}", flush=True)
    return value


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_config(preset: str, seq: int, recompute: str = "none"):
    return config.load(None, [f"model.preset={preset}", f"model.block_size={seq}",
                              f"model.activation_checkpointing={recompute}"]).model


@lru_cache(maxsize=1)
def peak_tflops() -> float:
    return device_peak_tflops(None)[0]  # on the CPU a 0.5 s measurement: once


def mfu(model_cfg, seq: int, tokens_s: float) -> float:
    return flops_per_token(model_cfg, seq) * tokens_s / 1e12 / peak_tflops()


# -- the bare model loop ---------------------------------------------------------------------

def build_model(model_cfg, plan: Plan, hf: bool):
    torch.manual_seed(0)
    if hf:
        model = hf_model(model_cfg)
    else:
        with torch.device(plan.device):  # initialised where it runs: the 1.2B shape's init is slow on the CPU
            model = GPT(model_cfg)
    dtype = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    return model.to(plan.device, dtype).train()


def bare_step_fn(model, plan: Plan, batch: int, seq: int, vocab: int, hf: bool):
    """One training step as the trainer's defaults take it (AdamW betas, weight decay, clip 1.0)."""
    t = config.TrainConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay, fused=plan.device == "cuda")
    ids = torch.randint(0, vocab, (batch, seq), device=plan.device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss if hf else model(ids, labels=ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed_tokens_s(step, steps: int, tokens_per_step: int) -> float:
    for _ in range(BARE_WARMUP):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return tokens_per_step * steps / (time.perf_counter() - start)


def memory_text() -> str:
    return f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if torch.cuda.is_available() else "memory n/a on CPU"


def bare(plan: Plan, model_cfg, batch: int, seq: int, steps: int, hf: bool = False):
    free_memory()
    model = build_model(model_cfg, plan, hf)
    step = bare_step_fn(model, plan, batch, seq, model_cfg.vocab_size, hf)
    tokens_s = timed_tokens_s(step, steps, batch * seq)
    text = f"{tokens_s:,.0f} tokens/s, MFU {mfu(model_cfg, seq, tokens_s):.1%}, {memory_text()}, {batch} x {seq}"
    del model, step
    free_memory()
    return tokens_s, text


# -- `gptscale train` in a subprocess --------------------------------------------------------

def train_sets(plan: Plan, preset: str, seq: int, recompute: str, micro_batch: int, steps: int, precision: str,
               out_dir: str, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [f"model.preset={preset}", f"model.block_size={seq}", f"model.activation_checkpointing={recompute}",
            "data.synthetic=true", f"train.out_dir={out_dir}", f"train.steps={steps}",
            f"train.micro_batch={micro_batch}", f"train.precision={precision}", "train.eval_every=0",
            "train.eval_batches=1", "train.sample_tokens=0", "train.progress=false", "train.save_every=0",
            "train.warmup_steps=2", *extra]
    return [arg for value in sets for arg in ("--set", value)]


def train_env() -> dict:
    env = dict(os.environ)
    if torch.cuda.is_available():
        # Only this GPU's kernels in DeepSpeed's JIT build (the image lists many arches).
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}a"  # the suffix exercises ds_env's fix
    return env


class TrainRun:
    """One `gptscale train` process. It is stopped as soon as its last step is logged: the
    end-of-run evaluation and checkpoint (~17 GB for the 1.2B shape) are not what is measured."""

    def __init__(self, sets: list[str], steps: int, out_dir: Path, entry: tuple[str, ...] = ("-m", "gptscale.cli")):
        self.steps, self.out_dir, self.started = steps, out_dir, time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = out_dir / "stderr.txt"
        with open(self.stderr_path, "w") as err, open(out_dir / "stdout.txt", "w") as out:
            self.proc = subprocess.Popen([sys.executable, *entry, "train", *sets], cwd=ROOT, stdout=out,
                                         stderr=err, env=train_env(), start_new_session=True)
        LIVE.append(self)

    def records(self) -> list[dict]:
        path = self.out_dir / "run" / "metrics.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
        return [r for r in map(json.loads, lines) if "wall_s" in r]

    def done(self) -> bool:
        if len(self.records()) >= self.steps:
            self.stop()
            return True
        return self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # this run's own process group
        self.proc.wait()

    def result(self) -> list[dict]:
        self.wall = time.monotonic() - self.started
        records = self.records()
        if len(records) < self.steps:
            raise RuntimeError(f"exit {self.proc.returncode} after {len(records)}/{self.steps} steps: "
                               f"{last_error_line(self.stderr_path.read_text())}")
        return records


def wait_all(runs: list[TrainRun], timeout: float) -> list[list[dict]]:
    deadline = time.monotonic() + max(timeout, 0.0)
    while not all(run.done() for run in runs):
        if time.monotonic() > deadline:
            for run in runs:
                run.stop()
            raise TimeoutError(f"stopped after {max(timeout, 0.0):.0f} s (time budget): "
                               f"{last_error_line(runs[0].stderr_path.read_text())}")
        time.sleep(0.5)
    return [run.result() for run in runs]


def wall_tokens_s(records: list[dict], warmup: int) -> float:
    """Tokens over wall time (metrics' monotonic wall_s) of the steps after warm-up: everything
    the loop does counts, unlike a mean of per-step rates."""
    first, last = records[warmup - 1], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["wall_s"] - first["wall_s"])


def train_text(plan: Plan, model_cfg, records: list[dict], wall: float, bare_tokens_s: float | None) -> tuple:
    tokens_s = wall_tokens_s(records, plan.train_warmup)
    peak = records[-1].get("peak_mem_gb")
    parts = [f"{tokens_s:,.0f} tokens/s", f"MFU {mfu(model_cfg, plan.seq, tokens_s):.1%}",
             f"train/bare {tokens_s / bare_tokens_s:.2f}x" if bare_tokens_s else "train/bare n/a (bare FAILED)",
             f"peak {peak:.1f} GB" if isinstance(peak, (int, float)) else "peak n/a",
             f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}",
             f"{wall:.0f} s with start-up"]
    return tokens_s, ", ".join(parts)


def train(plan: Plan, shape: Shape, recompute: str, bare_tokens_s: float | None, tmp: Path,
          extra: tuple[str, ...] = (), limit_s: float = 240.0):
    name = f"{shape.preset}-{recompute}-{len(ROWS)}"
    sets = train_sets(plan, shape.preset, plan.seq, recompute, shape.micro_batch, shape.train_steps, plan.precision,
                      str(tmp / name / "run"), extra)
    run = TrainRun(sets, shape.train_steps, tmp / name)
    records, = wait_all([run], min(limit_s, remaining(plan)))
    return train_text(plan, model_config(shape.preset, plan.seq, recompute), records, run.wall, bare_tokens_s)


# -- bf16 vs fp32 parity -----------------------------------------------------------------------

def parity(plan: Plan, tmp: Path):
    """The same run (model, seed, data) in both precisions, side by side; per-step losses compared."""
    preset, seq, micro_batch, steps, precisions = plan.parity
    runs = [TrainRun(train_sets(plan, preset, seq, "none", micro_batch, steps, p, str(tmp / f"parity-{p}" / "run")),
                     steps, tmp / f"parity-{p}") for p in precisions]
    low, high = ([r["loss"] for r in records] for records in wait_all(runs, min(180.0, remaining(plan))))
    diff = max(abs(a - b) for a, b in zip(low, high))
    rel = max(abs(a - b) / abs(b) for a, b in zip(low, high))
    verdict = "PASS" if rel <= PARITY_REL_TOL else "FAIL"
    return rel, (f"{verdict}: max |loss diff| {diff:.4f}, relative {rel:.2%} (tolerance {PARITY_REL_TOL:.0%}) over "
                 f"{steps} steps; final {low[-1]:.4f} vs {high[-1]:.4f}")


# -- profiles ------------------------------------------------------------------------------------

def profile_train(plan: Plan, shape: Shape, tmp: Path, out: dict):
    total, first, count = plan.profile
    out_json = tmp / "train-profile.json"
    sets = train_sets(plan, shape.preset, plan.seq, "none", shape.micro_batch, total, plan.precision,
                      str(tmp / "profile" / "run"))
    entry = (str(ROOT / "bench" / "gpu_check_profile.py"), str(out_json), str(first), str(count), "--")
    run = TrainRun(sets, total, tmp / "profile", entry)
    wait_all([run], min(120.0, remaining(plan)))
    out["trainer"] = json.loads(out_json.read_text())
    return None, short(out["trainer"])


def profile_bare(plan: Plan, shape: Shape, out: dict):
    model_cfg = model_config(shape.preset, plan.seq)
    model = build_model(model_cfg, plan, hf=False)
    step = bare_step_fn(model, plan, shape.micro_batch, plan.seq, model_cfg.vocab_size, hf=False)
    for _ in range(BARE_WARMUP):
        step()
    out["bare"] = profile_steps(step, plan.profile[2])
    del model, step
    free_memory()
    return None, short(out["bare"])


# -- the table -------------------------------------------------------------------------------

def recompute_rows(plan: Plan, tmp: Path) -> dict[tuple[str, str], float | None]:
    """Bare and trainer rows per shape and recompute; returns the bare tokens/s by (preset, recompute)."""
    bare_rates = {}
    for shape in plan.shapes:
        for recompute in plan.recompute:
            label = f"{shape.label}, {plan.precision}, seq {plan.seq}, recompute {recompute}"
            bare_tokens_s = attempt(f"{label}: bare loop", bare, plan, model_config(shape.preset, plan.seq, recompute),
                                    shape.micro_batch, plan.seq, shape.bare_steps)
            bare_rates[shape.preset, recompute] = bare_tokens_s
            jit = plan.device == "cuda" and not any("gptscale train" in name for name, _ in ROWS)
            attempt(f"{label}: gptscale train, ZeRO-3, 1 device" + (" (incl. JIT build)" if jit else ""),
                    train, plan, shape, recompute, bare_tokens_s, tmp)
    return bare_rates


def transformers_rows(plan: Plan) -> None:
    preset, batch, seq, steps = plan.hf
    model_cfg = model_config(preset, seq)
    ours = attempt(f"gptscale GPT, {preset}, {plan.precision}, bare loop, {batch} x {seq}", bare, plan, model_cfg,
                   batch, seq, steps)
    theirs = attempt("transformers GPT2LMHeadModel, same shape and loop", bare, plan, model_cfg, batch, seq, steps,
                     True)
    ratio = f"{ours / theirs:.2f}x (earlier runs, transformers with its slower gelu_new: 1.60x)" if ours and theirs else "n/a (a row FAILED)"
    ROWS.append(("ratio gptscale / transformers", ratio))


def optional_rows(plan: Plan, tmp: Path, bare_rates: dict) -> None:
    shape = plan.shapes[0]
    profiles: dict = {}
    attempt(f"profile, gptscale train {shape.label}, {plan.profile[2]} steps", profile_train, plan, shape, tmp,
            profiles)
    attempt(f"profile, bare loop {shape.label}, {plan.profile[2]} steps", profile_bare, plan, shape, profiles)
    out = Path(os.environ.get("OUT", "/tmp")) / "gpu_profile.json"
    out.write_text(json.dumps(profiles, indent=1))
    print(f"profiles written to {out}", flush=True)
    variants = [
        # At one rank ZeRO-3 partitions nothing: its "gather" points each parameter at its
        # partition (DeepSpeed's NoGatherHandle, no copy), but the fetch and release bookkeeping
        # still runs per block, forward and backward. Every parameter persistent skips it (the
        # review's variant F); on the CPU it measured 1.02x at one rank, so the zero3 template
        # keeps its threshold until this row shows a GPU gain.
        ("every parameter ZeRO-3-persistent (no gathers)", (f"train.ds_config={persistent_template(tmp)}",)),
        # An unknown model.compile (the flag is new) fails config loading: a FAILED row with its message.
        ("--set model.compile=true", ("model.compile=true",)),
    ]
    for what, extra in variants:
        name = f"{shape.label}, recompute none: gptscale train, {what}"
        if remaining(plan) < plan.variant_needs_s:
            ROWS.append((name, f"SKIPPED: {remaining(plan):.0f} s of the time budget left"))
            continue
        attempt(name, train, plan, shape, "none", bare_rates.get((shape.preset, "none")), tmp, extra,
                remaining(plan))


def persistent_template(tmp: Path) -> Path:
    """The zero3 template with a persistence threshold above any tensor: nothing is ever released."""
    template = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 10 ** 12
    path = tmp / "zero3_persistent.json"
    path.write_text(json.dumps(template))
    return path


def print_table() -> None:
    width = max(len(name) for name, _ in ROWS)
    print("\n| check | result |\n|---|---|")
    for name, value in ROWS:
        print(f"| {name:{width}s} | {value} |")
    print(f"\n{time.monotonic() - STARTED:.0f} s in all", flush=True)


def main() -> None:
    plan = CPU if SMOKE else GPU
    where = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if plan.device == "cuda" else "CPU smoke"
    print(f"torch {torch.__version__}, {where}", flush=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bare_rates = recompute_rows(plan, Path(tmp))
            transformers_rows(plan)
            attempt(f"bf16 vs fp32 parity, gptscale train {plan.parity[0]}", parity, plan, Path(tmp))
            optional_rows(plan, Path(tmp), bare_rates)
    finally:
        for run in LIVE:
            run.stop()
        print_table()


if __name__ == "__main__":
    main()
