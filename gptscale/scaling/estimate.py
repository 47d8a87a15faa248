"""`gptscale estimate`: a run's numbers on paper, before it spends a device-hour.

For one run config on a given cluster: exact parameter counts (whole model, per TP rank,
per pipeline stage), FLOPs per token and per step, memory per device broken into what
DeepSpeed keeps resident (parameters, gradients, fp32 master weights, Adam states, on the
device, the host or NVMe) and what a step adds (activations, gathered ZeRO-3 layers,
buckets, logits), the pipeline bubble, a step time from a documented compute +
communication model, and the time and device-hours for a token budget.

Exact where it can be: the parameter tensors per rank come from the model's own layers built
on the meta device (nothing allocated), and the model states follow DeepSpeed 0.19's
buffers tensor by tensor; `bench/estimate_vs_measured.py` checks them against real runs
(equal bytes). Activations follow gptscale's own layers (what each saves for backward),
with Korthikanti et al.'s formula alongside (`formulas.py`). Imports no torch.distributed and
no deepspeed: templates are read with `gptscale.ds_templates`, as training reads them.

The JSON (`--json`, `Estimate.to_dict()`) is described in README.md, "Scaling studies".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from gptscale import ds_templates, modes
from gptscale.config import ModelConfig, RunConfig
from gptscale.errors import ConfigError
from gptscale.model.counting import count_parameters
from gptscale.scaling import formulas

SCHEMA = "gptscale.estimate/1"
GB = 1e9  # memory and bandwidth in decimal gigabytes, as device data sheets state them
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OFFLOAD_TARGETS = ("none", "cpu", "nvme")


@dataclass(frozen=True)
class Cluster:
    """The hardware an estimate is for. Bandwidths are per device and direction, GB/s.

    Defaults describe an 8-GPU H100 node: NVLink 4 (450 GB/s), one 400 Gb/s NIC per GPU
    (50 GB/s), PCIe 5 x16 (50 GB/s usable ~ 25), one NVMe per device (~3 GB/s), DeepSpeed's
    CPU Adam (about 1e9 parameters/s per device's share of host cores).
    """

    devices: int | None = None  # world size; None: the run config's tp * pp * (dp or 1)
    device_memory_gb: float | None = None
    peak_tflops: float | None = None  # dense TFLOP/s per device at the run's precision
    devices_per_node: int = 8
    gemm_efficiency: float = 0.6  # share of peak the matmuls reach (the step-time model's compute rate)
    mfu: float | None = None  # if given, time to train uses it instead of the step-time model
    achieved_tflops: float | None = None  # or: hardware TFLOP/s per device, recompute counted (as papers report)
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    pcie_gbps: float = 25.0
    nvme_gbps: float = 3.0
    host_adam_params_per_s: float = 1e9
    overlap: float = 0.0  # share of data-parallel communication hidden behind compute (0: none, a bound)

    def __post_init__(self) -> None:
        for name in ("devices", "devices_per_node"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be >= 1")
        for name in ("device_memory_gb", "peak_tflops", "achieved_tflops", "intra_node_gbps", "inter_node_gbps",
                     "pcie_gbps", "nvme_gbps", "host_adam_params_per_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be a finite number > 0")
        for name in ("gemm_efficiency", "mfu"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be in (0, 1]")
        if not 0 <= self.overlap <= 1:
            raise ConfigError(f"--overlap={self.overlap} must be in [0, 1]")


@dataclass(frozen=True)
class Layout:
    """How a run is laid out: everything the memory and time model needs from the run config
    and its DeepSpeed template."""

    mode: str
    tp: int
    pp: int
    dp: int
    template: str
    zero_stage: int
    offload_params: str  # none | cpu | nvme
    offload_optimizer: str
    precision: str
    micro_batch: int
    grad_accum: int
    seq_len: int
    recompute: str  # none | selective | full
    sequence_parallel: bool = False
    virtual_stages: int = 1
    pipe_zero3_gather: str = "micro_batch"
    persistence_threshold: int = 100_000
    reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance
    prefetch_bucket: int = 50_000_000
    reduce_bucket: int = 500_000_000
    pipe_partition: str = "parameters"
    sub_group_size: int = 1_000_000_000  # ZeRO-3 steps the optimizer in sub-groups of this many elements
    optimizer_buffers: int = 4  # offload_optimizer.buffer_count (NVMe swap buffers)
    param_buffers: int = 5  # offload_param.buffer_count
    param_buffer_size: int = 100_000_000  # offload_param.buffer_size (elements)

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def gathers_once_per_step(self) -> bool:
        """ZeRO-3 inside pipeline stages with parallel.pipe_zero3_gather=step: each stage's
        parameters are gathered once for all the step's micro-batches and stay gathered."""
        return modes.by_name(self.mode).pipeline and self.zero_stage == 3 and self.pipe_zero3_gather == "step"

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp * self.seq_len


def _offload_target(zero: dict, key: str) -> str:
    device = _section(zero, key).get("device", "none")
    if device not in OFFLOAD_TARGETS:
        raise ConfigError(f"zero_optimization.{key}.device={device!r} in the DeepSpeed template must be one of "
                          f"{', '.join(OFFLOAD_TARGETS)}")
    return device


def _section(zero: dict, key: str) -> dict:
    section = zero.get(key)
    return section if isinstance(section, dict) else {}


def _template_int(zero: dict, key: str, default: int) -> int:
    value = zero.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"zero_optimization.{key}={value!r} in the DeepSpeed template must be a number >= 0")
    return int(value)


def layout_of(cfg: RunConfig, devices: int | None = None) -> Layout:
    """The layout `gptscale train` would run for `cfg` on `devices` ranks (checked as training
    checks it: the same config validators and template checks)."""
    p = cfg.parallel
    world = devices if devices is not None else p.tp * p.pp * (p.dp or 1)
    dp = p.resolve_dp(world)
    template = ds_templates.load_template(cfg)
    zero = template.get("zero_optimization") or {}
    zero = zero if isinstance(zero, dict) else {}
    return Layout(
        mode=p.resolved_mode, tp=p.tp, pp=p.pp, dp=dp, template=ds_templates.template_name(cfg),
        zero_stage=ds_templates.zero_stage(template),
        offload_params=_offload_target(zero, "offload_param"),
        offload_optimizer=_offload_target(zero, "offload_optimizer"),
        precision=cfg.train.precision, micro_batch=cfg.train.micro_batch, grad_accum=cfg.train.grad_accum,
        seq_len=cfg.data.seq_len, recompute=cfg.model.activation_checkpointing, sequence_parallel=p.sequence_parallel,
        virtual_stages=p.virtual_stages,
        pipe_zero3_gather=p.pipe_zero3_gather, pipe_partition=p.pipe_partition,
        persistence_threshold=_template_int(zero, "stage3_param_persistence_threshold", 100_000),
        reuse_distance=_template_int(zero, "stage3_max_reuse_distance", 1_000_000_000),
        prefetch_bucket=_template_int(zero, "stage3_prefetch_bucket_size", 50_000_000),
        reduce_bucket=_template_int(zero, "reduce_bucket_size", 500_000_000),
        sub_group_size=_template_int(zero, "sub_group_size", 1_000_000_000),
        optimizer_buffers=_template_int(_section(zero, "offload_optimizer"), "buffer_count", 4),
        param_buffers=_template_int(_section(zero, "offload_param"), "buffer_count", 5),
        param_buffer_size=_template_int(_section(zero, "offload_param"), "buffer_size", 100_000_000))


# -- parameters per rank ------------------------------------------------------------------

@dataclass(frozen=True)
class StageTensors:
    """The parameter tensors one TP rank of one pipeline stage holds (TP ranks hold equal sizes)."""

    numels: tuple[int, ...]
    largest_module: int  # parameters of the largest module (ZeRO-3 gathers a module at a time)
    decayed: tuple[bool, ...]  # per tensor: in the weight-decay parameter group (runtime/optim.py)
    blocks: int  # transformer blocks on the stage
    first: bool
    last: bool

    @property
    def total(self) -> int:
        return sum(self.numels)

    def zero3_partition(self, dp: int) -> int:
        """Elements of one rank's ZeRO-3 partition: DeepSpeed pads each tensor to a multiple of
        the DP size and gives every rank an equal share (stage3 `_aligned_size` / num_partitions)."""
        return sum(-(-n // dp) for n in self.numels)


@functools.lru_cache(maxsize=64)
def stage_tensors(model: ModelConfig, tp: int, pp: int, partition: str = "parameters") -> tuple[StageTensors, ...]:
    """Per pipeline stage (one entry at pp=1), the tensors of TP rank 0, read off the model's
    own pipeline layers built on the meta device and cut by the trainer's partitioner (a tied
    embedding counts on both stages that hold it; at pp=1 once)."""
    import torch

    from gptscale.model.gpt import weight_decay_applies
    from gptscale.model.stages import stage_bounds, stage_layers
    from gptscale.parallel.topology import TPGroup

    with torch.device("meta"):
        layers = stage_layers(model, TPGroup.shape_only(tp))
        shapes: dict[type, tuple[list[tuple[int, bool]], int]] = {}
        per_layer = []
        for layer in layers:
            key = layer.build  # every layer of a kind has the same arguments: build one of each
            if key not in shapes:
                module = layer.make()
                tensors = [(p.numel(), weight_decay_applies(layer.prefix + name, p.shape))
                           for name, p in module.named_parameters()]
                biggest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()),
                              default=0)
                shapes[key] = (tensors, biggest)
            per_layer.append(shapes[key])
    bounds = stage_bounds(model, pp, partition) if pp > 1 else [0, len(layers)]
    stages = []
    for stage, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        seen_ties, tensors, largest = set(), [], 0
        for layer, (layer_tensors, biggest) in zip(layers[start:stop], per_layer[start:stop]):
            if layer.tie_key is not None:
                if layer.tie_key in seen_ties:
                    continue
                seen_ties.add(layer.tie_key)
            tensors.extend(layer_tensors)
            largest = max(largest, biggest)
        stages.append(StageTensors(numels=tuple(n for n, _ in tensors), largest_module=largest,
                                   decayed=tuple(d for _, d in tensors),
                                   blocks=sum(layer.is_block for layer in layers[start:stop]),
                                   first=stage == 0, last=stage == pp - 1))
    return tuple(stages)


# -- memory -------------------------------------------------------------------------------

@dataclass
class Memory:
    """Bytes per device of one pipeline stage's rank, and what lives on the host and NVMe."""

    stage: int
    # Resident between steps (what DeepSpeed's optimizer keeps; equals runtime.memory.resident_bytes):
    parameters: int = 0
    gradients: int = 0
    master_weights: int = 0
    optimizer_states: int = 0
    # Added during a step:
    activations: int = 0
    logits: int = 0
    gathered_parameters: int = 0  # ZeRO-3: whole layers gathered for compute (+ the prefetch bucket)
    persistent_parameters: int = 0  # ZeRO-3: tensors below the persistence threshold, kept whole
    whole_gradients: int = 0  # ZeRO-0/1: the full gradient of the stage, from backward to the step
    buckets: int = 0  # gradient reduce bucket
    host: dict[str, int] = field(default_factory=dict)
    nvme: dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states

    @property
    def peak(self) -> int:
        return (self.model_states + self.activations + self.logits + self.gathered_parameters
                + self.persistent_parameters + self.whole_gradients + self.buckets)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items()}
        out.update(model_states=self.model_states, peak=self.peak)
        return out


def _flat_groups(stage: StageTensors, dp: int) -> list[int]:
    """ZeRO-0/1/2 and DeepSpeed's BF16_Optimizer flatten each parameter group (decayed, not
    decayed) into one buffer padded to a multiple of 2 * dp elements (`nccl_start_alignment_factor`
    of 2), later split into dp equal partitions: the padded size of each non-empty group."""
    alignment = 2 * dp
    sizes = [sum(n for n, d in zip(stage.numels, stage.decayed) if d == decayed) for decayed in (True, False)]
    return [-(-size // alignment) * alignment for size in sizes if size]


def model_state_memory(stage: StageTensors, layout: Layout, stage_index: int) -> Memory:
    """The tensors DeepSpeed 0.19 keeps between steps on one rank of `stage`, in bytes, and
    where they live (device, host, NVMe).

    ZeRO-3 (DeepSpeed stage3.py): each tensor's 1/dp partition in the parameter dtype; an fp32
    master copy of the partitions (kept even when the parameters are fp32); fp32 gradient
    partitions; Adam's exp_avg and exp_avg_sq in fp32, and a step counter per flat group.
    With mixed precision that is 2 + 4 + 4 + 8 = 18 bytes per parameter / dp, which is also
    Megatron-LM's count without a distributed optimizer (theoretical_memory_usage.py: 18) and
    the 18 of DeepSpeed's estimate_zero3_model_states_mem_needs; the ZeRO paper's 16 keeps 16-bit
    gradients. ZeRO-0/1 (PipelineEngine): whole flat parameters, fp32 master and Adam partitions;
    in fp32 the gradients exist from backward to the step (counted in the step's additions); in
    bf16 DeepSpeed's BF16_Optimizer keeps a whole fp32 gradient buffer resident.
    """
    b = PRECISION_BYTES[layout.precision]
    mem = Memory(stage=stage_index)
    dp = layout.dp
    if layout.zero_stage == 3:
        part = stage.zero3_partition(dp)
        groups = 2  # weight-decay and no-decay parameter groups, one flat fp32 buffer each
        params, master, grads = part * b, part * 4, part * 4
        adam = part * 8 + groups * 4  # + Adam's fp32 step tensor per group
        if layout.offload_params == "none":
            mem.parameters = params
        else:
            _place(mem, layout.offload_params, "parameters", params)
        if layout.offload_optimizer == "none":
            mem.master_weights, mem.gradients, mem.optimizer_states = master, grads, adam
        else:
            _place(mem, layout.offload_optimizer, "master_weights", master)
            _place(mem, layout.offload_optimizer, "optimizer_states", adam)
            # The fp32 gradient partition stays in host memory (grad_partitions_flat_buffer) either
            # way; with NVMe the optimizer swapper also writes it out beside the states it steps,
            # through buffer_count pinned buffers of one sub-group each (measured by
            # bench/beyond_memory.py: 18 bytes per parameter on NVMe in bf16, 20 in fp32).
            mem.host["gradients"] = grads
            if layout.offload_optimizer == "nvme":
                mem.nvme["gradients"] = grads
                mem.host["optimizer_swap_buffers"] = layout.optimizer_buffers * min(layout.sub_group_size, part) * 4
        if layout.offload_params == "nvme":  # pinned buffers the parameters are read into
            mem.host["parameter_swap_buffers"] = layout.param_buffers * layout.param_buffer_size * b
        persistent = sum(n for n in stage.numels if n < layout.persistence_threshold)
        mem.persistent_parameters = persistent * b
        mem.gathered_parameters = min(stage.largest_module + layout.prefetch_bucket, stage.total) * b
        if layout.gathers_once_per_step:
            mem.gathered_parameters = stage.total * b  # the stage stays gathered for the whole step
        mem.buckets = min(layout.reduce_bucket, stage.total) * b
    elif b != 4:
        # 16-bit at ZeRO-0/1 (the PipelineEngine): DeepSpeed's BF16_Optimizer keeps the flat 16-bit
        # parameters, a whole fp32 gradient accumulation buffer, and fp32 master and Adam partitions.
        flats = _flat_groups(stage, dp)
        mem.parameters = sum(flats) * b
        mem.gradients = sum(flats) * 4
        mem.master_weights = sum(flats) // dp * 4
        mem.optimizer_states = sum(flats) // dp * 8 + len(flats) * 4
    elif layout.zero_stage == 0:
        # fp32 without ZeRO: torch's AdamW steps the parameters themselves, with per-tensor state;
        # gradients exist from backward to the step.
        mem.parameters = stage.total * 4
        mem.optimizer_states = stage.total * 8 + len(stage.numels) * 4
        mem.whole_gradients = stage.total * 4
    else:
        # fp32 ZeRO-1/2 (DeepSpeedZeroOptimizer): flat parameters, an fp32 master and Adam
        # partition per group; the gradients exist from backward to the step.
        flats = _flat_groups(stage, dp)
        mem.parameters = sum(flats) * 4
        mem.master_weights = sum(flats) // dp * 4
        mem.optimizer_states = sum(flats) // dp * 8 + len(flats) * 4
        mem.whole_gradients = stage.total * 4
    return mem


def _place(mem: Memory, target: str, what: str, size: int) -> None:
    (mem.nvme if target == "nvme" else mem.host)[what] = size


def layer_activation_bytes(model: ModelConfig, layout: Layout) -> float:
    """Bytes one block of gptscale's model saves for backward, per micro-batch, on one TP rank.

    Counted tensor by tensor from what each op of gpt.py hands to autograd (Korthikanti et al.
    2022, section 4.1, do the same for Megatron's GPT-3 layer: sbh(34 + 5as/h) with dropout and
    stored softmax; see formulas.py). Activations in the parameter dtype (b bytes), statistics
    in fp32; s tokens, h = n_embd, f = ffn_hidden, n heads and k key/value heads of size q,
    t = TP size; per sequence:
      each norm: LayerNorm its input (b·sh) and fp32 mean and rstd (8·s; CPU kernels keep them
        in b bytes); RMSNorm, which computes in fp32, its fp32 input, rstd and normalised input
        (the scale's gradient needs it): 8·sh + 4·s
      attention: the QKV linear's input (b·sh); its output b·s(n+2k)q/t, kept alive by the V
        view; with RoPE the rotated Q and K, b·s(n+k)q/t; the fused SDPA kernel's output (which
        is also the projection's input, no copy) b·sh/t and fp32 logsumexp 4·sn/t; no s x s scores
      MLP: its input (b·sh); GELU: the up output and the GELU output, 2·b·sf/t; SwiGLU: the gate
        and up outputs, the SiLU output and the product, 4·b·sf/t
      dropout (model.dropout > 0): a 1-byte mask after attention and after the MLP
    times the micro-batch. Checked exactly by bench/estimate_vs_measured.py (equal bytes on
    both families, fp32). Sequence parallelism divides the norms' and dropout's terms by t
    (section 4.2.2); the linears' inputs are the gathered sequence, kept whole (Megatron keeps
    the 1/t shard and gathers it again in backward, not done here: Korthikanti's 34/t needs
    that). Selective recompute drops only SDPA's logsumexp: its output is the projection's input,
    kept anyway, and the fused kernel keeps no s x s scores to drop (measured,
    bench/activation_memory.py; with attention dropout torch's CPU math kernel does keep them).
    """
    b = PRECISION_BYTES[layout.precision]
    s, t, h, f = layout.seq_len, layout.tp, model.n_embd, model.ffn_hidden
    n, k, q = model.n_head, model.n_kv_head, model.head_dim
    rep = t if layout.sequence_parallel else 1  # the replicated (sequence) dimension's divisor
    norm = _norm_bytes(model, b, s, h) / rep
    rotated = b * s * (n + k) * q / t if model.uses_rope else 0
    logsumexp = 4 * s * n / t
    sdpa = b * s * h / t + logsumexp
    attention = b * s * h + b * s * (n + 2 * k) * q / t + rotated + sdpa
    mlp = b * s * h + (4 if model.uses_gated_mlp else 2) * b * s * f / t
    dropout = 2 * s * h / rep if model.dropout > 0 else 0
    total = 2 * norm + attention + mlp + dropout
    if layout.recompute == "selective":
        total -= logsumexp
    return total * layout.micro_batch


def _norm_bytes(model: ModelConfig, b: int, s: int, h: int) -> float:
    """Per sequence, what one norm keeps (see layer_activation_bytes)."""
    return 8 * s * h + 4 * s if model.uses_rmsnorm else b * s * h + 8 * s


def edge_activation_bytes(model: ModelConfig, layout: Layout, stage: StageTensors) -> tuple[float, float]:
    """(bytes, logits bytes) the stages at the ends save per micro-batch beyond their blocks.

    First stage: the token ids (int64). With RoPE, the cos/sin tables (s x q each), once in the
    dense model and per block in pipeline stages.
    Last stage: the final norm (as in a block) and b·sh for the head. DeepSpeed's PipelineEngine
    (the ZeRO-0/1 pipe mode) hands the last stage's logits to its loss_fn: it keeps the head's
    input and the fp32 log-softmax of the rank's vocabulary slice that the cross-entropy keeps,
    4·s·V/t (the logits themselves are not kept; they exist with their fp32 copy while the loss
    is computed). The ZeRO-3 modes (zero3, pipe_zero3) compute head and loss fused, chunk by
    chunk, with the gradients in forward (parallel/linear_cross_entropy.py): they keep the head
    input's gradient (b·sh, in place of the input) and the weight slice's, b·h·V/t whatever
    the batch, and no logits.
    """
    b = PRECISION_BYTES[layout.precision]
    s, h, mb = layout.seq_len, model.n_embd, layout.micro_batch
    rep = layout.tp if layout.sequence_parallel else 1
    edges = 0.0
    if model.uses_rope:
        # The cos/sin tables (s x q each): the dense model computes them once; in pipeline stages
        # every block computes its own. ZeRO-3 casts these buffers to the training dtype, the
        # PipelineEngine leaves them in fp32 (measured, bench/estimate_vs_measured.py).
        pair = 2 * s * model.head_dim * (b if layout.zero_stage == 3 else 4)
        edges += pair * (stage.blocks if layout.pp > 1 else 1)
    if stage.first:
        edges += 8 * s * mb
    logits = 0.0
    if stage.last:
        edges += (_norm_bytes(model, b, s, h) / rep + b * s * h) * mb
        local_vocab = model.padded_vocab_size(layout.tp) / layout.tp
        logits = b * h * local_vocab if layout.zero_stage == 3 else 4.0 * s * mb * local_vocab
    return edges, logits


def activation_memory(model: ModelConfig, layout: Layout, stage: StageTensors, stage_index: int) -> tuple[int, int]:
    """(activation bytes, logits bytes) one rank of a stage holds at its peak.

    Micro-batches in flight: one without a pipeline (gradient accumulation finishes each
    micro-batch's backward before the next forward); with 1F1B, stage i of p holds up to
    min(p - i, m) (Narayanan et al. 2021, section 2.2.1: the first stage p); interleaved over v
    chunks, min(warm-up + 1, m·v) chunks of 1/v of the stage each (formulas.one_f_one_b_warmup;
    the first stage about p + (p - 2)/v micro-batches' worth: more than plain 1F1B).
    Full recompute keeps each block's input (b·sh per sequence, /t with sequence parallelism)
    and rematerialises one block at a time in backward.
    """
    per_layer = layer_activation_bytes(model, layout)
    in_flight = 1.0
    if layout.pp > 1:  # in whole stages' worth: with v chunks each holds 1/v of the stage's blocks
        v = layout.virtual_stages
        warmup = formulas.one_f_one_b_warmup(layout.pp, stage_index, layout.grad_accum, v)
        in_flight = min(warmup + 1, layout.grad_accum * v) / v
    edges, logits = edge_activation_bytes(model, layout, stage)
    if layout.recompute == "full":
        b = PRECISION_BYTES[layout.precision]
        rep = layout.tp if layout.sequence_parallel else 1
        block_inputs = stage.blocks * b * layout.seq_len * model.n_embd * layout.micro_batch / rep
        activations = (block_inputs + edges) * in_flight + per_layer
    else:
        activations = (stage.blocks * per_layer + edges) * in_flight
    return int(activations), int(logits * in_flight)


# -- time ---------------------------------------------------------------------------------

@dataclass
class StepTime:
    """Seconds of one optimizer step on the slowest device, by the step-time model."""

    compute: float
    bubble: float
    tensor_parallel: float
    data_parallel: float
    pipeline_p2p: float
    offload: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tensor_parallel + self.data_parallel + self.pipeline_p2p + self.offload

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def step_time(model: ModelConfig, layout: Layout, stage: StageTensors, hardware_flops_per_step: float,
              cluster: Cluster, peak_tflops: float) -> StepTime:
    """The step-time model, per device of the busiest stage:

    compute = hardware FLOPs of the step / devices / (peak x gemm_efficiency);
    bubble = compute x f / (1 - f), f the pipeline bubble fraction (formulas.pipeline_bubble_fraction);
    tensor parallel = 4 all-reduces of b·s·h activation bytes per block and micro-batch (2 forward,
      2 backward; 2 more forward with full recompute), over NVLink when t <= devices per node;
    data parallel = ZeRO-3: per micro-batch 2 all-gathers of the stage's parameters (forward,
      backward) and a reduce-scatter of its gradients (pipe_zero3 gathering per step: 1 gather
      per step); ZeRO-0/1: one all-reduce of the gradients and an all-gather of the parameters
      per step. Ring volumes (formulas.ring_bytes_sent); over NVLink when a DP group (t·dp
      consecutive ranks) fits in a node, else the NIC; (1 - overlap) of it is exposed;
    pipeline p2p = an activation and its gradient per micro-batch and stage boundary;
    offload = parameters fetched from host/NVMe per micro-batch (2 x the partition), the
      gradients out and parameters back per step over PCIe, CPU Adam, NVMe swaps of master
      weights and Adam states (read and written).
    """
    b = PRECISION_BYTES[layout.precision]
    m, t, dp = layout.grad_accum, layout.tp, layout.dp
    compute = hardware_flops_per_step / layout.devices / (peak_tflops * 1e12 * cluster.gemm_efficiency)
    if layout.pp > 1:
        fraction = formulas.pipeline_bubble_fraction(layout.pp, m, layout.virtual_stages)
        bubble = compute * fraction / (1 - fraction)
    else:
        bubble = 0.0
    nvlink, nic = cluster.intra_node_gbps * GB, cluster.inter_node_gbps * GB
    activation = b * layout.micro_batch * layout.seq_len * model.n_embd
    tp_calls = (6 if layout.recompute == "full" else 4) * stage.blocks * m
    tp_link = nvlink if t <= cluster.devices_per_node else nic
    tensor_parallel = tp_calls * formulas.ring_bytes_sent("all_reduce", activation, t) / tp_link
    stage_bytes = stage.total * b
    if layout.zero_stage == 3:
        # zero3: a micro-batch's backward reuses what its forward gathered when the whole model
        # is within ZeRO-3's reuse distance (measured: tests/parallel/test_comm_volume.py), else
        # it gathers again. Pipeline stages interleave micro-batches: forward and backward gather.
        reused = not modes.by_name(layout.mode).pipeline and stage.total <= layout.reuse_distance
        gathers = 1 if layout.gathers_once_per_step else (m if reused else 2 * m)
        dp_bytes = (gathers * formulas.ring_bytes_sent("all_gather", stage_bytes, dp)
                    + m * formulas.ring_bytes_sent("reduce_scatter", stage.total * 4, dp))
    else:
        grad_bytes = stage.total * (4 if b == 4 else b)
        dp_bytes = (formulas.ring_bytes_sent("all_reduce", grad_bytes, dp)
                    + (formulas.ring_bytes_sent("all_gather", stage_bytes, dp) if layout.zero_stage else 0))
    dp_link = nvlink if t * dp <= cluster.devices_per_node else nic
    data_parallel = dp_bytes / dp_link * (1 - cluster.overlap)
    p2p_link = nvlink if t * dp < cluster.devices_per_node else nic
    pipeline_p2p = (2 * m * activation / t / p2p_link) if layout.pp > 1 else 0.0
    offload = 0.0
    partition = stage.zero3_partition(dp) if layout.zero_stage == 3 else sum(
        _flat_groups(stage, dp)) // dp
    if layout.offload_params != "none":
        link = cluster.nvme_gbps * GB if layout.offload_params == "nvme" else cluster.pcie_gbps * GB
        offload += 2 * m * partition * b / link
    if layout.offload_optimizer != "none":
        offload += partition * (4 + b) / (cluster.pcie_gbps * GB)
        offload += partition / cluster.host_adam_params_per_s
        if layout.offload_optimizer == "nvme":
            offload += 2 * partition * 12 / (cluster.nvme_gbps * GB)
    return StepTime(compute, bubble, tensor_parallel, data_parallel, pipeline_p2p, offload)


# -- the estimate -------------------------------------------------------------------------

@dataclass
class Estimate:
    cfg: RunConfig
    layout: Layout
    cluster: Cluster
    stages: tuple[StageTensors, ...]
    memory: list[Memory]
    flops_model_per_token: float
    flops_hardware_per_token: float
    peak_tflops: float | None
    step: StepTime | None
    tokens: float | None  # the token budget for time to train

    @property
    def worst(self) -> Memory:
        """The stage whose device needs the most memory at its peak."""
        return max(self.memory, key=lambda m: m.peak)

    @property
    def bubble_fraction(self) -> float:
        if self.layout.pp == 1:
            return 0.0
        return formulas.pipeline_bubble_fraction(self.layout.pp, self.layout.grad_accum, self.layout.virtual_stages)

    def fits(self) -> bool:
        return self.cluster.device_memory_gb is None or self.worst.peak <= self.cluster.device_memory_gb * GB

    def train_time_s(self) -> float | None:
        """Seconds to train `tokens`: at --mfu (model FLOPs), at --achieved-tflops (hardware
        FLOPs), else at the step-time model's rate."""
        if self.tokens is None:
            return None
        c, n = self.cluster, self.layout.devices
        if c.achieved_tflops is not None:
            return self.tokens * self.flops_hardware_per_token / (n * c.achieved_tflops * 1e12)
        if self.peak_tflops is None:
            return None
        if c.mfu is not None:
            return self.tokens * self.flops_model_per_token / (n * self.peak_tflops * c.mfu * 1e12)
        return self.tokens / self.layout.tokens_per_step * self.step.total

    def predicted_mfu(self) -> float | None:
        if self.step is None or self.peak_tflops is None:
            return None
        flops = self.flops_model_per_token * self.layout.tokens_per_step
        return flops / (self.step.total * self.layout.devices * self.peak_tflops * 1e12)

    def to_dict(self) -> dict:
        counts = count_parameters(self.cfg.model)
        train_s = self.train_time_s()
        per_step_tokens = self.layout.tokens_per_step
        return {
            "schema": SCHEMA,
            "layout": {**dataclasses.asdict(self.layout), "devices": self.layout.devices},
            "cluster": dataclasses.asdict(self.cluster),
            "parameters": {
                "total": counts.total, "embedding": counts.embedding, "positional": counts.positional,
                "blocks": counts.blocks, "final_norm": counts.final_norm, "head": counts.head,
                "matmul": counts.matmul,
                "per_tp_rank": sum(s.total for s in self.stages) - self._tied_duplicate(),
                "per_stage_per_tp_rank": [s.total for s in self.stages],
            },
            "flops": {
                "model_per_token": self.flops_model_per_token,
                "hardware_per_token": self.flops_hardware_per_token,
                "tokens_per_step": per_step_tokens,
                "model_per_step": self.flops_model_per_token * per_step_tokens,
                "hardware_per_step": self.flops_hardware_per_token * per_step_tokens,
            },
            "memory": {
                "per_stage": [m.to_dict() for m in self.memory],
                "worst_stage": self.worst.stage,
                "peak_per_device": self.worst.peak,
                "device_memory": None if self.cluster.device_memory_gb is None else self.cluster.device_memory_gb * GB,
                "fits": self.fits(),
            },
            "bubble_fraction": self.bubble_fraction,
            "step_time": None if self.step is None else self.step.to_dict(),
            "peak_tflops": self.peak_tflops,
            "predicted_mfu": self.predicted_mfu(),
            "train": None if self.tokens is None else {
                "tokens": self.tokens, "steps": math.ceil(self.tokens / per_step_tokens),
                "seconds": train_s, "days": None if train_s is None else train_s / 86400,
                "device_hours": None if train_s is None else train_s * self.layout.devices / 3600},
        }

    def _tied_duplicate(self) -> int:
        """A tied embedding is held by the first and the last stage; the model has it once."""
        if self.layout.pp == 1 or not self.cfg.model.tie_embeddings:
            return 0
        return self.cfg.model.padded_vocab_size(self.layout.tp) // self.layout.tp * self.cfg.model.n_embd


def estimate(cfg: RunConfig, cluster: Cluster = Cluster(), tokens: float | None = None,
             layout: Layout | None = None) -> Estimate:
    """The estimate for `cfg` on `cluster` (layout: as `gptscale train` would run it, unless given)."""
    layout = layout or layout_of(cfg, cluster.devices)
    model = cfg.model
    stages = stage_tensors(model, layout.tp, layout.pp, layout.pipe_partition)
    memory = []
    for index, stage in enumerate(stages):
        mem = model_state_memory(stage, layout, index)
        mem.activations, mem.logits = activation_memory(model, layout, stage, index)
        memory.append(mem)
    matmul = count_parameters(model).matmul
    args = (matmul, model.n_layer, model.n_head, model.head_dim, layout.seq_len)
    flops_model = formulas.training_flops_per_token(*args)
    flops_hardware = formulas.hardware_flops_per_token(*args, layout.recompute)
    peak = cluster.peak_tflops
    step = None
    if peak is not None:
        busiest = max(stages, key=lambda s: s.total)
        step = step_time(model, layout, busiest, flops_hardware * layout.tokens_per_step, cluster, peak)
    return Estimate(cfg, layout, cluster, stages, memory, flops_model, flops_hardware, peak, step, tokens)
