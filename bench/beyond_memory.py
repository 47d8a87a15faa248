"""Beyond memory, for real: a few optimizer steps of a model whose training state does not fit
in this machine's RAM, with ZeRO-Infinity (ZeRO-3, parameters and optimizer states offloaded
to NVMe) on 2 CPU ranks through gptscale's own trainer.

Recipe
------
1. DeepSpeed's NVMe swapping needs its `async_io` op, which JIT-compiles against libaio:

       apt-get install -y libaio-dev      # then `DS_ACCELERATOR=cpu .venv/bin/ds_report` shows async_io [OKAY]

   `cpu_adam` (DeepSpeedCPUAdam, which runs Adam where the optimizer states are) and
   `pin_memory` JIT-compile too (g++ and ninja; the first run spends a few minutes on it,
   cached in ~/.cache/torch_extensions afterwards).
2. Any run trains this way with the `zero3_nvme` template and a folder on a fast local disk:

       OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/torchrun --standalone --nproc_per_node 2 \\
           -m gptscale.cli train --config my.yaml --set train.ds_config=zero3_nvme --set train.nvme_path=/nvme

   The model is built inside `deepspeed.zero.Init`, which reads `offload_param` from the same
   DeepSpeed config: each layer's parameters are partitioned and written to NVMe as the layer
   is constructed, so no rank ever holds the whole model (gptscale's zero3 mode already does
   this; nothing had to change).
3. This benchmark does one such run, reproducibly, and measures it (`make beyond-memory`):

       nice -n 10 .venv/bin/python bench/beyond_memory.py --nvme-dir /var/tmp --json runs/beyond_memory.json

   Defaults: GPT-2 shape, 36 layers, d=2048, vocab 4096, seq 128, bf16, micro-batch 1, 2 ranks:
   1,821,552,640 parameters, ~33 GB in --nvme-dir. It writes a template tuned for a small host
   (`max_in_cpu: 0`, so every swappable parameter really lives on NVMe and not in DeepSpeed's
   CPU cache; a small `sub_group_size` and swap buffers; `stage3_max_reuse_distance: 0`, so
   gathered layers are freed at once; the stock `zero3_nvme` template keeps DeepSpeed's default
   1e9-element sub-groups and a 1e9-element parameter cache in RAM: at this size its four
   optimizer swap buffers of one 0.9e9-element sub-group alone would be 14.6 GB per rank, by
   DeepSpeed's buffer arithmetic, not tried), builds the model, trains `--steps`
   optimizer steps (ZeRO-3 forward/backward, DeepSpeedCPUAdam on swapped-in sub-groups; no
   evaluation and no checkpoint, which would need as much disk again), and reports: the parameter
   count; the training state at the usual 16 bytes/parameter and what DeepSpeed really keeps,
   against the machine's RAM; model-init and per-step time; the peak RSS of each rank (VmHWM)
   and of both; the peak size of the NVMe folder; and, when gptscale.scaling.estimate is
   importable, the estimator's prediction for the same config next to the measurement.
   `--limit-gib` caps each rank's private writable memory (RLIMIT_DATA: heap and anonymous
   mappings, i.e. every tensor; Linux refuses allocations past it) to show the run stays within
   a given budget. The NVMe folder is deleted at the end; the run refuses to start (and a
   watcher kills its ranks) if the disk's free space would fall below `--keep-free-gb`.

What DeepSpeed 0.19 keeps where (the NVMe folder's measured peak matches these to 0.05%):
  NVMe, per parameter: the parameter partition (2 bytes in bf16, 4 in fp32) + fp32 master
  weight 4 + Adam exp_avg and exp_avg_sq 8 + the fp32 gradient the optimizer swapper stages
  for the step 4 = 18 bytes (bf16) or 20 (fp32).
  Host, per rank: the fp32 gradient partition (`grad_partitions_flat_buffer`, 4 bytes per element
  of the rank's partition, resident even with the optimizer on NVMe), the swap buffers (8
  parameter + 4 optimizer buffers of one sub-group each), and about 3.5 bytes per partition
  element more at the step's peak that we could not attribute to a tensor (the parameters'
  own storage is empty outside the swap buffers). In all, ~7.6 bytes per parameter summed over
  the ranks, against 16 in the state.

What limits the size on a 2-core, 24 GiB host with ~55 GB free disk (keeping 12 GB free):
  first the disk (18 bytes/parameter: 2x RAM = 3.16B parameters would need 57 GB); then RAM:
  at ~7.6 bytes/parameter plus ~1.4 GiB per rank, 23.5 GiB holds ~2.9B parameters at most,
  a state of ~1.8x RAM, so with DeepSpeed 0.19 this host could not reach 2x RAM even with an
  unlimited disk; then time: each step streams the whole state through the disk (~1 minute per
  step at 1.8B parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

GiB = 2 ** 30
# What DeepSpeed writes to NVMe per parameter (ZeRO-3, offload_param and offload_optimizer nvme):
# the parameter partition in the training dtype, then fp32 master weight, Adam exp_avg and
# exp_avg_sq, and the fp32 gradient partition the optimizer swapper stages for the step.
NVME_BYTES_PER_PARAM = {"fp32": 4 + 4 + 8 + 4, "bf16": 2 + 4 + 8 + 4}
# glibc: few arenas, and every block of 1 MiB or more its own mapping, returned to the kernel when
# freed (ZeRO-3 allocates and frees each layer's gathered parameters and gradients every step; with
# glibc's sliding mmap threshold those pile up in the heap as RSS).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
STATE_BYTES_PER_PARAM = 16  # the usual mixed-precision count: 2 (bf16 weight) + 2 (grad) + 12 (fp32 master + Adam)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _Stop(Exception):
    pass


class _NoSkips:
    def nonfinite(self, step: int, what: str) -> None:
        raise _Stop(f"non-finite loss at step {step} ({what})")


def _rank(overrides: list[str], steps: int, limit_gib: float | None) -> dict:
    """One rank: build the Trainer (model init under zero.Init, engine), then `steps` optimizer
    steps straight through the runtime (no evaluation, no checkpoint: a checkpoint of this model
    would need as much disk again)."""
    import resource

    if limit_gib:  # RLIMIT_DATA: private writable memory (heap, anonymous maps: every tensor), enforced by Linux
        cap = int(limit_gib * GiB)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import torch.distributed as dist

    from gptscale import config
    from gptscale.train.loop import Trainer

    start = time.perf_counter()
    trainer = Trainer(config.load(None, overrides), "none")
    dist.barrier()
    init_s = time.perf_counter() - start
    init_hwm = _status_kib("VmHWM") * 1024
    runtime = trainer.runtime
    batches = iter(trainer.task.train_batches(trainer.topo.coords.dp, trainer.topo.layout.dp))
    runtime.train()
    step_s, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        losses.append(runtime.train_step(batches, step, _NoSkips()))
        dist.barrier()
        step_s.append(time.perf_counter() - t0)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in runtime.engine.module.parameters())
    return {"rank": dist.get_rank(), "pid": os.getpid(), "init_s": init_s, "step_s": step_s, "losses": losses,
            "params": params, "init_peak_rss": init_hwm, "peak_rss": _status_kib("VmHWM") * 1024,
            "peak_vm": _status_kib("VmPeak") * 1024, "vm_data": _status_kib("VmData") * 1024,
            "limit": int(limit_gib * GiB) if limit_gib else None}


class Watcher(threading.Thread):
    """Samples the NVMe folder's allocated bytes, the disk's free space and the ranks' summed RSS;
    kills the ranks (this process's children, by PID) if free space falls below `keep_free`."""

    def __init__(self, folder: Path, keep_free: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.folder, self.keep_free, self.period = folder, keep_free, period
        self.peak_disk = self.peak_rss_sum = 0
        self.min_free = shutil.disk_usage(folder).free
        self.aborted: str | None = None
        self.done = threading.Event()

    def _folder_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
                except FileNotFoundError:
                    pass
        return total

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.wait(self.period):
            self.peak_disk = max(self.peak_disk, self._folder_bytes())
            free = shutil.disk_usage(self.folder).free
            self.min_free = min(self.min_free, free)
            rss = 0
            children = me.children()  # the ranks (and multiprocessing's tracker); not their forks, which share pages
            for child in children:
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss_sum = max(self.peak_rss_sum, rss)
            if free < self.keep_free and self.aborted is None:
                self.aborted = f"free disk {free / 1e9:.1f} GB fell below --keep-free-gb; ranks killed"
                for child in children:
                    try:
                        child.kill()
                    except psutil.Error:
                        pass


def template(buffer_numel: int, sub_group: int, nvme: str) -> dict:
    return {
        "zero_optimization": {
            "stage": 3, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": 20_000_000, "stage3_prefetch_bucket_size": 20_000_000,
            "stage3_param_persistence_threshold": 100_000, "stage3_max_live_parameters": 200_000_000,
            "stage3_max_reuse_distance": 0, "sub_group_size": sub_group,
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 4},
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 8,
                              "buffer_size": buffer_numel, "max_in_cpu": 0},
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True},
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    }


def estimator_prediction(cfg, world: int, ram_bytes: int) -> dict | None:
    """ESTIMATOR HOOK: gptscale.scaling.estimate's prediction for the same run config, or the
    reason there is none (the bench runs without the estimator)."""
    try:
        from gptscale.scaling.estimate import Cluster, estimate
    except ImportError as exc:
        return {"error": f"gptscale.scaling.estimate not importable: {exc}"}
    try:
        result = estimate(cfg, Cluster(devices=world, device_memory_gb=ram_bytes / world / 1e9,
                                       devices_per_node=world))
        return result.to_dict()
    except Exception as exc:  # noqa: BLE001 - a prediction must never stop the measurement
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="gpt2", choices=("gpt2", "llama"))
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--embd", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--sub-group", type=int, default=10_000_000, help="ZeRO-3 sub_group_size (elements)")
    parser.add_argument("--nvme-dir", default="/var/tmp", help="a folder on the disk to swap to")
    parser.add_argument("--keep-free-gb", type=float, default=13.0, help="never let the disk's free space go below")
    parser.add_argument("--limit-gib", type=float, default=None,
                        help="cap each rank's private writable memory (RLIMIT_DATA), GiB")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    world = 2

    from gptscale import config
    from gptscale.model.counting import count_parameters
    from gptscale.testing.distributed import run_ranks

    model = [f"model.family={args.family}", f"model.vocab_size={args.vocab}", f"model.n_layer={args.layers}",
             f"model.n_embd={args.embd}", f"model.n_head={args.heads}", f"model.block_size={args.seq}"]
    if args.family == "llama":
        model.append(f"model.n_kv_head={args.heads}")
    cfg = config.load(None, model)
    n_params = count_parameters(cfg.model).total
    d, f = cfg.model.n_embd, cfg.model.ffn_hidden
    largest = max(cfg.model.padded_vocab_size(1) * d, (cfg.model.n_head + 2 * cfg.model.n_kv_head) * cfg.model.head_dim * d,
                  f * d)
    partition = -(-largest // world)
    # The parameter swapper's buffers also stage the fp32 master weights' first fill, one
    # sub-group at a time: each must hold the largest sub-group (sub_group_size plus one partition).
    buffer_numel = args.sub_group + partition + 2 ** 20
    nvme_need = NVME_BYTES_PER_PARAM[args.precision] * n_params
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    keep_free = int(args.keep_free_gb * 1e9)
    free = shutil.disk_usage(args.nvme_dir).free
    if free - nvme_need * 1.05 < keep_free:
        raise SystemExit(f"beyond_memory: {n_params:,} parameters need ~{nvme_need / 1e9:.1f} GB in {args.nvme_dir}, "
                         f"which has {free / 1e9:.1f} GB free; that would leave less than --keep-free-gb="
                         f"{args.keep_free_gb}. Choose fewer --layers or a smaller --embd.")
    print(f"{args.family} {args.layers} x d={args.embd}, vocab {args.vocab}, seq {args.seq}: {n_params:,} parameters; "
          f"needs ~{nvme_need / 1e9:.1f} GB on NVMe ({free / 1e9:.1f} GB free); RAM {ram / GiB:.1f} GiB", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="gptscale-beyond-memory-", dir=args.nvme_dir))
    watcher = Watcher(folder, keep_free)
    try:
        tpl = folder / "zero3_nvme_small_host.json"
        tpl.write_text(json.dumps(template(buffer_numel, args.sub_group, str(folder / "swap"))))
        overrides = [*model, "data.synthetic=true", f"data.seq_len={args.seq}", "train.micro_batch=1",
                     "train.grad_accum=1", f"train.steps={args.steps}", "data.num_workers=0", "train.eval_every=0", "train.sample_tokens=0",
                     "train.progress=false", "train.tensorboard=false", f"train.precision={args.precision}",
                     f"train.ds_config={tpl}", f"train.nvme_path={folder / 'swap'}", f"train.out_dir={folder / 'run'}"]
        run_cfg = config.load(None, overrides)
        prediction = estimator_prediction(run_cfg, world, ram)
        watcher.start()
        wall = time.perf_counter()
        try:
            ranks = run_ranks(_rank, world, overrides, args.steps, args.limit_gib, timeout=args.timeout,
                              env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **MALLOC_ENV})
        finally:
            watcher.done.set()
            watcher.join()
            if watcher.aborted:
                print(f"beyond_memory: {watcher.aborted}", flush=True)
        wall = time.perf_counter() - wall
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report(args, ranks, watcher, n_params, nvme_need, ram, wall, prediction, run_cfg)


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def estimator_rows(prediction: dict | None, ranks: list[dict], nvme_peak: int) -> list[tuple[str, str]]:
    """The estimator's numbers next to the measured ones (on CPU its 'device' is host memory too)."""
    if not prediction or "error" in prediction:
        return [("estimator (same config)", str(prediction and prediction.get("error")))]
    stage = prediction["memory"]["per_stage"][0]
    host = sum(stage.get("host", {}).values()) + stage["peak"]
    nvme = sum(stage.get("nvme", {}).values()) * len(ranks)
    measured = max(r["peak_rss"] for r in ranks)
    split = f"host {_gib(host - stage['peak'])} + device peak {_gib(stage['peak'])}"
    return [("estimator: host per rank", f"{_gib(host)} predicted ({split}) vs {_gib(measured)} peak RSS"),
            ("estimator: NVMe, both ranks", f"{_gib(nvme)} predicted vs {_gib(nvme_peak)} measured")]


def report(args, ranks, watcher, n_params, nvme_need, ram, wall, prediction, run_cfg) -> None:
    state = STATE_BYTES_PER_PARAM * n_params
    kept = NVME_BYTES_PER_PARAM[args.precision] * n_params
    steps = [max(r["step_s"][i] for r in ranks) for i in range(args.steps)]
    peak_sum = sum(r["peak_rss"] for r in ranks)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
        "shape": {"family": args.family, "layers": args.layers, "embd": args.embd, "heads": args.heads,
                  "vocab": args.vocab, "seq": args.seq, "precision": args.precision, "micro_batch": 1, "ranks": 2,
                  "sub_group_size": args.sub_group},
        "parameters": n_params, "parameters_engine": ranks[0]["params"],
        "state_bytes_16_per_param": state, "state_bytes_deepspeed": kept, "ram_bytes": ram,
        "state_over_ram": state / ram, "limit_data_per_rank": args.limit_gib and args.limit_gib * GiB,
        "init_s": max(r["init_s"] for r in ranks), "step_s": steps, "losses": ranks[0]["losses"],
        "peak_rss_per_rank": [r["peak_rss"] for r in ranks], "init_peak_rss_per_rank": [r["init_peak_rss"] for r in ranks],
        "peak_vm_per_rank": [r["peak_vm"] for r in ranks], "vm_data_end_per_rank": [r["vm_data"] for r in ranks],
        "peak_rss_sum_of_ranks": peak_sum, "peak_rss_sum_sampled": watcher.peak_rss_sum,
        "nvme_peak_bytes": watcher.peak_disk, "nvme_predicted_bytes": nvme_need,
        "disk_min_free_bytes": watcher.min_free, "wall_s": wall, "estimator": prediction,
    }
    model = (f"{args.family}, {args.layers} layers, d={args.embd}, vocab {args.vocab}, seq {args.seq}, "
             f"{args.precision}, micro-batch 1, 2 CPU ranks (DP=2)")
    losses = ", ".join(f"{x:.3f}" for x in results["losses"])
    both = (f"{_gib(watcher.peak_rss_sum)} sampled at once, {_gib(peak_sum)} summing per-rank peaks; "
            f"state = {state / peak_sum:.2f}x that")
    cap = (f"RLIMIT_DATA {args.limit_gib:g} GiB per rank: state (16 B/param) = "
           f"{state / (2 * args.limit_gib * GiB):.2f}x the {2 * args.limit_gib:g} GiB both ranks may use"
           if args.limit_gib else "none (--limit-gib)")
    free_min = f"{watcher.min_free / 1e9:.1f} GB"
    rows = [
        ("model", model),
        ("parameters", f"{n_params:,} (engine: {ranks[0]['params']:,})"),
        ("state, 16 B/param", f"{_gib(state)} = {state / ram:.2f}x RAM ({_gib(ram)})"),
        ("state DeepSpeed keeps", f"{_gib(kept)} ({NVME_BYTES_PER_PARAM[args.precision]} B/param) = {kept / ram:.2f}x RAM"),
        ("NVMe folder peak", f"{_gib(watcher.peak_disk)} (predicted {_gib(nvme_need)}); disk free min {free_min}"),
        ("model + engine init", f"{results['init_s']:.1f} s"),
        ("optimizer steps", ", ".join(f"{s:.1f} s" for s in steps) + f" (losses {losses})"),
        ("peak RSS per rank", ", ".join(_gib(r["peak_rss"]) for r in ranks)
         + f" (after init: {', '.join(_gib(r['init_peak_rss']) for r in ranks)})"),
        ("peak RSS, both ranks", both),
        ("peak virtual per rank", ", ".join(_gib(r["peak_vm"]) for r in ranks)
         + f" (VmData at the end: {', '.join(_gib(r['vm_data']) for r in ranks)})"),
        ("memory cap", cap),
        *estimator_rows(prediction, ranks, watcher.peak_disk),
        ("wall time", f"{wall:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
