"""Run configuration: typed, frozen dataclasses loaded from YAML plus `key=value` overrides.

One source of truth for every number. Loading is strict: an unknown key, a value of the
wrong type or an impossible combination raises `ConfigError` with a one-line message that
names the field, the value and the fix. This module never imports torch; the run modes
`parallel.mode` accepts come from the registry in `gptscale.modes`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from gptscale import modes
from gptscale.errors import ConfigError
from gptscale.presets import preset_dict
from gptscale.safe_yaml import load_yaml_file
from gptscale.typed import from_dict, merge_overrides

FAMILIES = ("gpt2", "llama")
MAX_LAYERS = 10_000  # the deepest published models have a few hundred
MAX_CONTEXT = 1 << 20  # tokens: RoPE and position tables are built for the whole context
PIPE_ZERO3_GATHER = ("micro_batch", "step")
PIPE_PARTITIONS = ("parameters", "blocks")
# What a block keeps for backward: everything (none), all but the attention core softmax(QK^T)V,
# which is recomputed (selective, Korthikanti et al. 2022), or only its input (full).
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the GPT. `family` picks the building blocks:

    - gpt2:  learned positions, LayerNorm, GELU MLP, biases, tied input/output embeddings
    - llama: RoPE, RMSNorm, SwiGLU MLP, no biases, grouped-query attention, untied head

    `bias`, `tie_embeddings`, `n_kv_head` and `ffn_hidden` default from the family
    (None = family default) and are resolved in __post_init__, so a loaded config is concrete.
    """

    family: str = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the model accepts (positions / RoPE table)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: n_head (plain multi-head attention)
    ffn_hidden: int | None = None  # None: 4*n_embd (gpt2) or Llama's 8/3*n_embd rounded to 256
    bias: bool | None = None
    tie_embeddings: bool | None = None
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # The vocabulary is padded to a multiple of (vocab_pad_multiple * tp) so that each TP
    # rank holds an equal, aligned slice; the padded logits are masked and never change the loss.
    vocab_pad_multiple: int = 64
    # none | selective | full (RECOMPUTE above); true/false, the older spelling, mean full/none.
    activation_checkpointing: str | bool = "none"
    # torch.compile each block's computation (gptscale/model/compile.py); KV-cache decoding stays eager.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r} is unknown; choose one of {', '.join(FAMILIES)}")
        is_gpt2 = self.family == "gpt2"
        defaults = {
            "n_kv_head": self.n_head,
            "bias": is_gpt2,
            "tie_embeddings": is_gpt2,
            "ffn_hidden": 4 * self.n_embd if is_gpt2 else llama_ffn_hidden(self.n_embd),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if isinstance(self.activation_checkpointing, bool):
            object.__setattr__(self, "activation_checkpointing", "full" if self.activation_checkpointing else "none")
        self.validate()

    @staticmethod
    def training_only_fields() -> tuple[str, ...]:
        """Fields that change how the model trains, not what its weights are: a run may resume
        with other values."""
        return ("dropout", "activation_checkpointing", "init_std", "compile")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The shape of a named preset (see `gptscale presets`), with optional field overrides."""
        return from_dict(cls, {**preset_dict(name), **overrides}, "model")

    # -- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def uses_rope(self) -> bool:
        return self.family == "llama"

    @property
    def uses_rmsnorm(self) -> bool:
        return self.family == "llama"

    @property
    def uses_gated_mlp(self) -> bool:
        return self.family == "llama"

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.vocab_pad_multiple * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    def validate(self) -> None:
        _require_positive(self, "model", ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                          "n_kv_head", "ffn_hidden", "vocab_pad_multiple"))
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                              f"pick n_embd as a multiple of n_head")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}; "
                              f"grouped-query attention needs n_head to be a multiple of n_kv_head")
        if self.uses_rope and self.head_dim % 2:
            raise ConfigError(f"model.n_embd/n_head={self.head_dim} is odd; RoPE needs an even head size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.activation_checkpointing not in RECOMPUTE:
            raise ConfigError(f"model.activation_checkpointing={self.activation_checkpointing!r} is unknown; choose "
                              f"one of {', '.join(RECOMPUTE)}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            _require_finite(self, "model", name, above=0.0)
        for name, most in (("n_layer", MAX_LAYERS), ("block_size", MAX_CONTEXT)):
            if getattr(self, name) > most:
                raise ConfigError(f"model.{name}={getattr(self, name)} is beyond what gptscale builds (at most "
                                  f"{most:,}); is a digit too many?")

    def check_tensor_parallel(self, tp: int) -> None:
        """Errors for shapes a tensor-parallel degree `tp` cannot split evenly."""
        if self.n_head % tp:
            raise ConfigError(f"model.n_head={self.n_head} is not divisible by parallel.tp={tp}; "
                              f"choose tp among the divisors of n_head")
        if self.n_kv_head % tp:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} is not divisible by parallel.tp={tp}; "
                              f"each TP rank needs whole key/value heads, so use tp <= n_kv_head dividing it")
        if self.ffn_hidden % tp:
            raise ConfigError(f"model.ffn_hidden={self.ffn_hidden} is not divisible by parallel.tp={tp}")


def llama_ffn_hidden(n_embd: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*n_embd (same FLOPs as a GELU MLP), rounded up."""
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of parallelism. world_size = tp * pp * dp; dp=None derives it from the world.

    mode: how the model is split and trained: a run mode registered in `gptscale.modes`
      (README, "Parallelism"), or auto, which picks one for parallel.pp.
    pipe_partition: how blocks are spread over stages: `parameters` (balance parameter
      counts; embedding and head weigh in) or `blocks` (equal numbers of blocks).
    pipe_zero3_gather: pipe_zero3 gathers a stage's parameters per `micro_batch` (least
      memory) or once per `step` for all its micro-batches (less communication).
    virtual_stages: interleaved 1F1B (Narayanan et al. 2021) in pipe_zero3: each stage holds
      this many model chunks (stage s: chunks s, pp + s, ...); the bubble shrinks by this factor.
    sequence_parallel: Megatron's sequence parallelism (needs tp > 1): outside the
      tensor-parallel regions (norms, dropout, residual stream) each TP rank holds 1/tp of the
      sequence; TP's all-reduces become all-gathers and reduce-scatters of the same volume.
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    mode: str = "auto"
    pipe_partition: str = "parameters"
    pipe_zero3_gather: str = "micro_batch"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    # Seconds any collective may wait (NCCL / gloo): a rank that died mid-run ends the job after
    # this, not after torch's default 30 minutes. Raise it for very long saves or first steps.
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _require_positive(self, "parallel", ("tp", "pp", "dp", "virtual_stages"))
        _require_finite(self, "parallel", "collective_timeout_s", above=0.0)
        if self.pipe_partition not in PIPE_PARTITIONS:
            raise ConfigError(f"parallel.pipe_partition={self.pipe_partition!r} is unknown; choose one of "
                              f"{', '.join(PIPE_PARTITIONS)}")
        if self.pipe_zero3_gather not in PIPE_ZERO3_GATHER:
            raise ConfigError(f"parallel.pipe_zero3_gather={self.pipe_zero3_gather!r} is unknown; choose one of "
                              f"{', '.join(PIPE_ZERO3_GATHER)}")
        modes.check(self.mode, self.pp)
        if self.virtual_stages > 1 and (self.pp == 1 or not modes.resolve(self.mode, self.pp).interleaves):
            runs_it = ", ".join(name for name in modes.names()[1:] if modes.by_name(name).interleaves)
            raise ConfigError(f"parallel.virtual_stages={self.virtual_stages} interleaves pipeline stages, which "
                              f"only parallel.mode={runs_it} runs: set that mode and parallel.pp > 1, or "
                              f"virtual_stages=1")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the sequence over "
                              "the tensor-parallel ranks); set parallel.tp or sequence_parallel=false")

    @property
    def resolved_mode(self) -> str:
        """The run mode's name (`auto` resolved for parallel.pp)."""
        return modes.resolve(self.mode, self.pp).name

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel degree for `world_size` ranks; raises if the product cannot match."""
        model_parallel = self.tp * self.pp
        if self.dp is None:
            if world_size % model_parallel:
                raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp="
                                  f"{self.tp}*{self.pp}; launch a multiple of {model_parallel} ranks")
            return world_size // model_parallel
        if model_parallel * self.dp != world_size:
            raise ConfigError(f"parallel.tp*pp*dp={self.tp}*{self.pp}*{self.dp}={model_parallel * self.dp} "
                              f"does not equal the world size {world_size}; launch that many ranks "
                              f"or set parallel.dp to null to derive it")
        return self.dp


def tp_groups_span_nodes(tp: int, ranks_per_node: int) -> str | None:
    """Why tensor-parallel groups (tp consecutive ranks) would span nodes of `ranks_per_node`
    ranks, or None when every node holds whole TP groups. Checked at launch (`gptscale train`)
    and by the layout search."""
    if tp == 1 or ranks_per_node % tp == 0:
        return None
    return (f"parallel.tp={tp} does not divide the {ranks_per_node} rank(s) on this node, so tensor-parallel groups "
            f"span nodes; use a tp that divides the GPUs per node, or start a multiple of {tp} ranks per node")


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from.

    path: a folder written by `gptscale data prepare` (its train and val splits), or
    synthetic: true for random tokens (benchmarks and exact-parity tests; no files).
    """

    path: str | None = None
    synthetic: bool = False
    seq_len: int | None = None  # None: model.block_size
    num_workers: int = 1  # loader processes per rank; 0 reads in the training process
    shuffle_shards: int = 2  # shards per shuffle buffer; 0 keeps file order
    seed: int = 1234

    def __post_init__(self) -> None:
        _require_positive(self, "data", ("seq_len",))
        if self.num_workers < 0 or self.shuffle_shards < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} and data.shuffle_shards={self.shuffle_shards} "
                              f"must be >= 0")
        if (self.path is None) == (not self.synthetic):
            raise ConfigError("set exactly one of data.path (a folder from 'gptscale data prepare') "
                              "and data.synthetic=true")
        if self.seed < 0:
            raise ConfigError(f"data.seed={self.seed} must be >= 0")


PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: batch sizes, schedule, precision, checkpoints, logging."""

    out_dir: str = "runs/default"
    steps: int = 100
    micro_batch: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    decay: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"
    # A template in ds_configs/ (zero3, zero3_offload, zero3_nvme, pipe_zero1, pipe_zero0) or a
    # JSON path; None: the mode's default (zero3, or pipe_zero1 with pipeline stages).
    ds_config: str | None = None
    nvme_path: str = "/local_nvme"  # for the zero3_nvme template
    seed: int = 1234
    eval_every: int = 50  # steps; 0 = only at the end
    eval_batches: int = 8
    log_every: int = 1
    save_every: int = 0  # steps; 0 = only at the end (and on SIGTERM / SIGUSR1)
    keep_checkpoints: int = 2
    init_from: str | None = None  # canonical safetensors weights to start from
    max_nonfinite: int = 5  # bad steps in a row (NaN/Inf loss or gradient norm, step skipped) that stop the run
    peak_tflops: float | None = None  # per device, for MFU; None: a known GPU's peak, or measured on CPU
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    sample_tokens: int = 48  # tokens generated from the sample prompt at the end; 0 = none
    sample_prompt: str = "def "
    sample_temperature: float = 0.8  # 0 = greedy; also `gptscale generate`'s default
    sample_top_k: int = 50

    def __post_init__(self) -> None:
        _require_positive(self, "train", ("steps", "micro_batch", "grad_accum", "eval_batches", "log_every",
                                          "keep_checkpoints", "max_nonfinite"))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if self.decay not in DECAYS:
            raise ConfigError(f"train.decay={self.decay!r} is unknown; choose one of {', '.join(DECAYS)}")
        _require_finite(self, "train", "lr", above=0.0)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        for name in ("weight_decay", "grad_clip", "sample_temperature"):
            _require_finite(self, "train", name, at_least=0.0)
        _require_finite(self, "train", "eps", above=0.0)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.peak_tflops is not None:
            _require_finite(self, "train", "peak_tflops", above=0.0)
        if not self.out_dir.strip():
            raise ConfigError("train.out_dir is empty; name the run folder (e.g. runs/my-run)")
        if self.seed < 0:
            raise ConfigError(f"train.seed={self.seed} must be >= 0")
        for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.sample_top_k < 1:
            raise ConfigError(f"train.sample_top_k={self.sample_top_k} must be >= 1")


FINETUNE_METHODS = ("full", "lora")
# Short names of the linears LoRA may adapt; `mlp` is every MLP linear of the family.
LORA_TARGETS = ("qkv", "proj", "up", "gate", "down", "mlp", "head")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the tensor-parallel linears: y = W x + (alpha / rank) B A x.

    targets: comma-separated short names: qkv (fused attention input), proj (attention
    output), up, gate (llama), down, mlp (= up, gate, down), head (an untied output head).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "qkv,proj,mlp"

    def __post_init__(self) -> None:
        _require_positive(self, "finetune.lora", ("rank",))
        _require_finite(self, "finetune.lora", "alpha", above=0.0)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"finetune.lora.dropout={self.dropout} must be in [0, 1)")
        names = self.target_names
        unknown = [n for n in names if n not in LORA_TARGETS]
        choices = f"use a comma-separated list of {', '.join(LORA_TARGETS)}"
        if not names:
            raise ConfigError(f"finetune.lora.targets={self.targets!r} names no target; {choices}")
        if unknown:
            raise ConfigError(f"finetune.lora.targets={self.targets!r}: {unknown[0]!r} is not a target; {choices}")

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.strip() for n in self.targets.split(",") if n.strip()))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class FinetuneConfig:
    """`gptscale finetune`: supervised fine-tuning on a folder from `gptscale data prepare-sft`,
    starting from train.init_from. method: full (every weight trains) or lora (adapters only;
    the base is frozen and has no optimizer state).

    eval_answers: held-out examples whose greedy answer is compared with the reference at the
    end of the run (exact match); 0 = none. answer_tokens: the longest answer generated.
    """

    method: str = "full"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval_answers: int = 64
    answer_tokens: int = 32

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"finetune.method={self.method!r} is unknown; choose one of {', '.join(FINETUNE_METHODS)}")
        if self.eval_answers < 0:
            raise ConfigError(f"finetune.eval_answers={self.eval_answers} must be >= 0")
        _require_positive(self, "finetune", ("answer_tokens",))

    @property
    def uses_lora(self) -> bool:
        return self.method == "lora"


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=True))
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def lora(self) -> LoRAConfig | None:
        """The adapters a run's model carries (None: none)."""
        return self.finetune.lora if self.finetune.uses_lora else None

    def __post_init__(self) -> None:
        self.model.check_tensor_parallel(self.parallel.tp)
        if self.data.seq_len is None:
            object.__setattr__(self, "data", dataclasses.replace(self.data, seq_len=self.model.block_size))
        if self.data.seq_len > self.model.block_size:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.block_size={self.model.block_size}")
        if self.parallel.sequence_parallel and self.data.seq_len % self.parallel.tp:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is not divisible by parallel.tp={self.parallel.tp}, "
                              f"which parallel.sequence_parallel splits it over; pick a seq_len that is a multiple "
                              f"of {self.parallel.tp}")
        v, pp = self.parallel.virtual_stages, self.parallel.pp
        if v > 1 and self.model.n_layer % (pp * v):
            raise ConfigError(f"parallel.virtual_stages={v} does not divide the {self.model.n_layer / pp:g} blocks per "
                              f"stage (model.n_layer={self.model.n_layer}, parallel.pp={pp}); each stage needs "
                              f"{v} chunks of whole blocks: make n_layer a multiple of pp * virtual_stages = {pp * v}")
        if v > 1 and self.train.grad_accum % pp:
            raise ConfigError(f"train.grad_accum={self.train.grad_accum} is not a multiple of parallel.pp={pp}; "
                              f"interleaved 1F1B (parallel.virtual_stages={v}) takes micro-batches in groups of pp")
        if self.parallel.pp > self.model.n_layer:
            raise ConfigError(f"parallel.pp={self.parallel.pp} exceeds model.n_layer={self.model.n_layer}: every "
                              f"pipeline stage needs at least one block; use parallel.pp <= {self.model.n_layer}")
        self._check_compile()

    def _check_compile(self) -> None:
        """model.compile compiles a block's computation between DeepSpeed's hooks: under ZeRO-3
        only where each block is one leaf module (gathered by hooks on the block, not its layers)."""
        if not self.model.compile:
            return
        spec = modes.resolve(self.parallel.mode, self.parallel.pp)
        if not spec.compiles_blocks:
            raise ConfigError(f"model.compile=true cannot be used with parallel.mode={spec.name}: its blocks are not "
                              f"ZeRO-3 leaf modules, so DeepSpeed's per-layer gather hooks would split every compiled "
                              f"block into pieces; use another parallel.mode, or model.compile=false")
        if 3 in spec.zero_stages and self.lora is not None:
            raise ConfigError(f"model.compile=true cannot be used with finetune.method=lora under "
                              f"parallel.mode={spec.name}: ZeRO-3 LoRA runs gather parameters per layer, not per "
                              f"block, so DeepSpeed's hooks would split every compiled block into pieces; use a "
                              f"pipeline mode without ZeRO-3, or model.compile=false")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require_finite(obj: Any, section: str, name: str, *, above: float | None = None,
                    at_least: float | None = None) -> None:
    value = getattr(obj, name)
    if not math.isfinite(value) or (above is not None and not value > above) or (
            at_least is not None and not value >= at_least):
        bound = f"> {above}" if above is not None else f">= {at_least}"
        raise ConfigError(f"{section}.{name}={value} must be a finite number {bound}")


def _require_positive(obj: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"{section}.{name}={value} must be >= 1")


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config from YAML (or defaults when path is None) and apply overrides.

    `model.preset: NAME` starts the model section from a named preset; keys next to it
    override the preset's values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml_file(path, f"config file {str(path)!r}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    data = merge_overrides(data, list(overrides))
    return from_dict(RunConfig, _expand_preset(data))


def _expand_preset(data: dict[str, Any]) -> dict[str, Any]:
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        model = dict(model)
        name = model.pop("preset")
        if not isinstance(name, str):
            raise ConfigError(f"model.preset={name!r} must be a preset's name (see gptscale presets)")
        data = {**data, "model": {**preset_dict(name), **model}}
    return data
