"""Any training checkpoint, read tensor by tensor in canonical form (TP-merged, unpadded, fp32).

DeepSpeed's files are memory-mapped, never loaded whole, and the pages a tensor was copied
from are handed back to the kernel at once, so reading a 70B checkpoint needs the memory of
its largest tensor, not of the model (DeepSpeed's zero_to_fp32 materialises the whole fp32
state dict). Where each canonical tensor lives, by the mode's CheckpointFiles kind:

    ONE_ZERO_ENGINE        per TP rank, every DP rank's zero_pp_rank_D_mp_rank_TT_optim_states.pt
                           holds its partition of the fp32 weights and Adam's moments (ZeRO-3: of
                           each parameter; ZeRO-1/2: of each group's flat buffer, see
                           ZeroEngineFiles); the parameters' names and shapes are in the model
                           states file.
    ZERO_ENGINE_PER_STAGE  the same, per pipeline stage folder, names `layers.<i>.<name>`.
    PIPELINE_LAYERS        whole weights per stage layer and TP rank; Adam's state in ZeRO-1
                           files per stage x TP rank, under the PipelineModule's names.

The TP shards of one tensor are then merged with the split table (convert/tp.py).
"""
from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import Iterator

import torch

from gptscale import config, modes
from gptscale.checkpoint.layout import (CONFIG, TOKENIZER, CheckpointMeta, Layout, pipeline_layer_file,
                                        rank_state_file, stage_dir)
from gptscale.checkpoint.rank_state import load_rank_state
from gptscale.config import RunConfig
from gptscale.convert.tp import canonical_layout, merge_tensor
from gptscale.parallel.lora import is_adapter
from gptscale.ds_import import load_without_code
from gptscale.errors import CheckpointError, UserError
from gptscale.model.stages import (StageLayer, StageModule, chunk_ranges, layers_with_parameters, stage_layers,
                                   stage_specs)
from gptscale.modes import CheckpointFiles
from gptscale.parallel.topology import TPGroup

def release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel that the mapped file pages under `tensor` are not needed any more.
    They are clean (never written), so they drop out of this process's RSS and are read from
    the file again if touched; without this, every page read stays resident until the file
    is closed, and reading a whole checkpoint would cost its whole size."""
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return
    page = mmap.PAGESIZE
    start = storage.data_ptr() + tensor.storage_offset() * tensor.element_size()
    end = start + tensor.numel() * tensor.element_size()
    first = start // page * page
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), 4)  # MADV_DONTNEED


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


def _mapped(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete (copied in part?) "
                              f"or was written with another layout")
    state = load_without_code(path, map_location="cpu", mmap=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a DeepSpeed state dict; the file is damaged")
    return state


class ZeroEngineFiles:
    """One ZeRO engine's files for one TP rank, every DP rank's partition memory-mapped.

    ZeRO-3 splits each parameter (and its Adam moments) into `dp` equal partitions, rank d
    holding elements [d*n, (d+1)*n) of the padded parameter, parameters packed one after
    another per optimizer group ("fp32_flat_groups"). ZeRO-1/2 split each group's flat buffer
    instead: the ranks' partitions ("single_partition_of_fp32_groups", saved without their
    padding) concatenate to the group, whose parameters follow one another with DeepSpeed's
    alignment paddings between them."""

    def __init__(self, folder: Path, tp_rank: int, dp: int, what: str = "weights"):
        """`tp_rank`: the mp_rank of the file names (the TP rank; stage x TP in a pipe checkpoint)."""
        self.folder = folder
        if what == "optimizer" and not (folder / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_optim_states.pt").is_file():
            raise CheckpointError(f"{folder} holds no ZeRO optimizer files (it was trained with ZeRO stage 0?); its "
                                  f"optimizer state cannot be read: consolidate the weights only, or resume it at its "
                                  f"own layout")
        # ZeRO-3 writes model states per DP rank, ZeRO-1/2 one file per TP rank.
        per_dp = folder / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
        model = _mapped(per_dp if per_dp.is_file() else folder / f"mp_rank_{tp_rank:02d}_model_states.pt")
        groups = model.get("param_shapes")
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise CheckpointError(f"{folder}: the model states of TP rank {tp_rank} lack 'param_shapes'; not a "
                                  f"DeepSpeed ZeRO checkpoint")
        self.optim = []
        for d in range(dp):
            path = folder / f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_optim_states.pt"
            state = _mapped(path).get("optimizer_state_dict")
            count = state.get("partition_count") if isinstance(state, dict) else None
            stage = int(state.get("zero_stage", 0)) if isinstance(state, dict) else 0
            partitions = count if stage == 3 else max(count) if isinstance(count, list) and count else None
            if stage not in (1, 2, 3) or partitions != dp:
                raise CheckpointError(f"{path} is not a ZeRO partition of {dp} (zero_stage {stage}, partitions "
                                      f"{count}); the checkpoint does not match its COMPLETE.json layout")
            self.optim.append(state)
        self.stage = stage
        self.frozen = self._frozen(model, folder, tp_rank, dp)
        # name -> (group, [(DP rank, start in its flat partition, length, start in the tensor)], shape)
        self.where: dict[str, tuple[int, list[tuple[int, int, int, int]], torch.Size]] = {}
        for g, shapes in enumerate(groups):
            lengths = [self._flat(state, "fp32", g).numel() for state in self.optim]
            paddings = (self.optim[0].get("param_alignment_paddings") or [None] * len(groups))[g] if stage < 3 else None
            end = self._index_group(g, shapes, lengths, dp, paddings)
            available = lengths[0] * dp if stage == 3 else sum(lengths)
            if end > available or (stage == 3 and (end != available or len(set(lengths)) > 1)):
                raise CheckpointError(f"{folder}: optimizer group {g} holds {available} elements over its DP ranks, "
                                      f"its parameters need {end}; the files are damaged or from different saves")

    def _index_group(self, g: int, shapes: dict, lengths: list[int], dp: int, paddings) -> int:
        """Record where each parameter of group `g` lies; returns the elements the group uses."""
        offset = 0
        starts = [sum(lengths[:d]) for d in range(dp)]  # ZeRO-1/2: where each rank's partition begins
        for i, (name, shape) in enumerate(shapes.items()):
            shape = torch.Size(shape)
            numel = shape.numel()
            if self.stage == 3:
                part = -(-numel // dp)
                spans = [(d, offset, min(part, numel - d * part), d * part) for d in range(dp) if d * part < numel]
                offset += part
            else:
                spans = [(d, max(offset, starts[d]) - starts[d],
                          min(offset + numel, starts[d] + lengths[d]) - max(offset, starts[d]),
                          max(offset, starts[d]) - offset)
                         for d in range(dp) if max(offset, starts[d]) < min(offset + numel, starts[d] + lengths[d])]
                offset += numel + (paddings[i] if paddings else 0)
            self.where[name] = (g, spans, shape)
        return offset * (dp if self.stage == 3 else 1)

    def _frozen(self, model: dict, folder: Path, tp_rank: int, dp: int) -> dict[str, tuple[list[torch.Tensor], torch.Size]]:
        """Frozen (not trained) parameters: under ZeRO-3 each DP rank's model states file holds
        its fragment; under ZeRO-1/2 rank 0's holds them whole."""
        shapes = model.get("frozen_param_shapes") or {}
        if not shapes:
            return {}
        fragments = [model.get("frozen_param_fragments") or {}]
        for d in range(1, dp if self.stage == 3 else 1):
            other = _mapped(folder / f"zero_pp_rank_{d}_mp_rank_{tp_rank:02d}_model_states.pt")
            fragments.append(other.get("frozen_param_fragments") or {})
        return {name: ([f[name] for f in fragments], torch.Size(shape)) for name, shape in shapes.items()
                if all(name in f for f in fragments)}

    def names(self) -> list[str]:
        return list(self.where) + [n for n in self.frozen if n not in self.where]

    def _flat(self, state: dict, kind: str, group: int) -> torch.Tensor:
        kind = "fp32" if kind == "master" else kind
        try:
            if self.stage == 3:
                if kind == "fp32":
                    return state["fp32_flat_groups"][group]
                return state["optimizer_state_dict"]["state"][group][kind]
            if kind == "fp32":
                return state["single_partition_of_fp32_groups"][group]
            return self._base_state(state)[group][kind]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"{self.folder}: no {kind} state for optimizer group {group}; the checkpoint "
                                  f"holds no optimizer state of that kind") from None

    @staticmethod
    def _base_state(state: dict):
        """ZeRO-1/2's Adam state per group: a list (elastic checkpoints, padding removed) or the
        torch optimizer's state_dict (its tensors keep the padding, at their end)."""
        base = state["base_optimizer_state"]
        return base["state"] if isinstance(base, dict) else base

    def adam_step(self) -> int:
        """Optimizer steps Adam took (its bias correction; skipped steps make it lag the step)."""
        state = self.optim[0]
        try:
            step = (state["optimizer_state_dict"]["state"][0] if self.stage == 3 else self._base_state(state)[0])["step"]
            return int(step.item() if torch.is_tensor(step) else step)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError):
            raise CheckpointError(f"{self.folder}: no Adam step count in the optimizer state; the checkpoint holds "
                                  f"no optimizer state to continue from") from None

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """This TP rank's whole `name` (fp32 weights or an Adam moment), in fresh memory."""
        if name not in self.where:
            if kind not in ("fp32", "master"):
                raise CheckpointError(f"{self.folder}: {name} is frozen and has no optimizer state")
            pieces, shape = self.frozen[name]
            return torch.cat([p.flatten() for p in pieces])[:shape.numel()].view(shape).clone()
        group, spans, shape = self.where[name]
        out = torch.empty(shape.numel(), dtype=torch.float32)
        for d, start, length, at in spans:
            piece = self._flat(self.optim[d], kind, group).narrow(0, start, length)
            out[at:at + length].copy_(piece)
            release_pages(piece)
        return out.view(shape)


class CheckpointReader:
    """A training checkpoint folder of any mode and layout, as canonical tensors on demand."""

    def __init__(self, path: str | Path, open_base=None):
        """`open_base(path, model_cfg)`: opens the base weights a LoRA run's checkpoint leaves out
        (checkpoint.convert.open_weights; `open_source` passes it)."""
        self.path = Path(path)
        self.meta = CheckpointMeta.read(self.path)
        self.layout: Layout = self.meta.layout
        self.cfg: RunConfig = config.load(self.path / CONFIG)
        mode = modes.by_name(self.layout.mode) if self.layout.mode in modes.names() else None
        if mode is None:
            raise CheckpointError(f"{self.path / 'COMPLETE.json'}: unknown run mode {self.layout.mode!r}; one of "
                                  f"{', '.join(modes.names()[1:])}")
        tp = self.layout.tp
        self.shapes, self.table = canonical_layout(self.cfg.model, self.cfg.lora)
        # What has optimizer state: a LoRA run's base is frozen.
        self.trained = [n for n in self.shapes if is_adapter(n)] if self.cfg.lora else list(self.shapes)
        with torch.device("meta"):
            self._layers = layers = stage_layers(self.cfg.model, TPGroup.shape_only(tp))
        self.tokenizer_dir = self.path / TOKENIZER if (self.path / TOKENIZER).is_dir() else None
        self._pipe_optimizer: dict[str, list[tuple[object, str]]] | None = None
        # canonical name -> per TP rank, (files, the name inside them)
        self._sources: dict[str, list[tuple[object, str]]] = {}
        self.kind = kind = mode.checkpoint_files
        if kind is CheckpointFiles.PIPELINE_LAYERS:
            self._index_pipeline_layers(layers, tp)
        elif kind is CheckpointFiles.ZERO_ENGINE_PER_STAGE:
            p = self.cfg.parallel
            ranges = chunk_ranges(self.cfg.model, self.layout.pp, p.pipe_partition, p.virtual_stages)
            for stage in range(self.layout.pp):
                specs = stage_specs(layers, ranges[stage])
                engines = [ZeroEngineFiles(stage_dir(self.path, stage), t, self.layout.dp) for t in range(tp)]
                for local in engines[0].names():
                    self._sources.setdefault(StageModule.canonical_name(specs, local),
                                             [(e, local) for e in engines])
        else:
            engines = [ZeroEngineFiles(self.path, t, self.layout.dp) for t in range(tp)]
            for local in engines[0].names():
                self._sources[local.removeprefix("module.")] = [(e, local) for e in engines]
        self._base = self._lora_base(open_base) if self.cfg.lora is not None else None
        missing = [n for n in self.shapes if n not in self._sources and (self._base is None or n not in self._base.shapes)]
        unexpected = [n for n in self._sources if n not in self.shapes]
        if missing or unexpected:
            raise CheckpointError(f"{self.path}: its files do not hold the weights of the model in {CONFIG} "
                                  f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                                  f"{unexpected[:2]}); the config and the files come from different runs")

    def _lora_base(self, open_base):
        """A LoRA run's checkpoint holds the adapters alone (runtime.base.save_native); its frozen
        base is the run's train.init_from, read from there."""
        origin = self.cfg.train.init_from
        if open_base is None:
            raise CheckpointError(f"{self.path} holds LoRA adapters only; open it with checkpoint.convert.open_source, "
                                  f"which reads its base too")
        if not origin:
            raise CheckpointError(f"{self.path}: a LoRA checkpoint whose {CONFIG} names no train.init_from; its base "
                                  f"weights are nowhere")
        try:
            base = open_base(origin, self.cfg.model)
        except UserError as err:
            raise CheckpointError(f"{self.path} holds LoRA adapters only; its base, train.init_from={origin}, cannot be "
                                  f"read ({err}); put the base back there, or pass the adapters alone ('generate "
                                  f"--adapter', 'convert to-hf --adapter')") from None
        wrong = [n for n, shape in base.shapes.items() if n in self.shapes and tuple(shape) != tuple(self.shapes[n])]
        if wrong:
            raise CheckpointError(f"{self.path}: its base train.init_from={origin} has {wrong[0]} of shape "
                                  f"{tuple(base.shapes[wrong[0]])}, the run's model {tuple(self.shapes[wrong[0]])}")
        return base

    def _index_pipeline_layers(self, layers: list[StageLayer], tp: int) -> None:
        for index in layers_with_parameters(layers):
            files = [_PipelineLayerFile(pipeline_layer_file(self.path, index, t)) for t in range(tp)]
            for local in files[0].names():
                self._sources.setdefault(layers[index].prefix + local, [(f, local) for f in files])

    def _optimizer_sources(self) -> dict[str, list[tuple[object, str]]]:
        """Where Adam's state is. A pipe checkpoint keeps it apart from the layer files: ZeRO-1
        files per model-parallel rank (stage x TP, TP minor), under the PipelineModule's names
        (`<layer index>.<name>`, `tied_modules.<key>.<name>`)."""
        if self.kind is not CheckpointFiles.PIPELINE_LAYERS:
            return self._sources
        if self._pipe_optimizer is None:
            tp, found = self.layout.tp, {}
            tied = {layer.tie_key: layer for layer in self._layers if layer.tie_key is not None}
            for stage in range(self.layout.pp):
                engines = [ZeroEngineFiles(self.path, stage * tp + t, self.layout.dp, what="optimizer")
                           for t in range(tp)]
                for local in engines[0].names():
                    head, rest = local.split(".", 1)
                    if head == "tied_modules":
                        key, rest = rest.split(".", 1)
                        prefix = tied[key].prefix if key in tied else "?"
                    else:
                        prefix = self._layers[int(head)].prefix if head.isdigit() and int(head) < len(self._layers) else "?"
                    found.setdefault(prefix + rest, [(e, local) for e in engines])
            missing = [n for n in self.trained if n not in found]
            if missing:
                raise CheckpointError(f"{self.path}: the pipeline's optimizer files lack {missing[:2]}; the checkpoint "
                                      f"is damaged or its config is another model's")
            self._pipe_optimizer = found
        return self._pipe_optimizer

    def trainer_state(self) -> dict:
        """What a run needs besides tensors to continue: the step, the layout it was saved at
        and every rank's data-loader position (the learning-rate schedule follows the step)."""
        data = [load_rank_state(rank_state_file(self.path, r))[0] for r in range(self.layout.world_size)]
        return {"step": self.meta.step, "adam_step": self._adam_step(), "run_id": self.meta.run_id,
                "layout": self.layout.to_json(), "data": data}

    def _adam_step(self) -> int:
        engine = next(files for sources in self._optimizer_sources().values() for files, _ in sources)
        return engine.adam_step()

    @property
    def names(self) -> list[str]:
        """Canonical names, in the dense model's order."""
        return list(self.shapes)

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """The canonical (TP-merged, unpadded) fp32 `name`, of `kind`: "fp32" the weights,
        "master" the optimizer's master weights (the same values unless training was bf16),
        "exp_avg" or "exp_avg_sq" Adam's moments."""
        if name not in self._sources and self._base is not None:  # a LoRA run's frozen base
            if kind != "fp32":
                raise CheckpointError(f"{self.path}: {name} is frozen in this LoRA run; it has no {kind}")
            return self._base.tensor(name)
        sources = self._sources if kind == "fp32" else self._optimizer_sources()
        pieces = [files.tensor(local, kind) for files, local in sources[name]]
        merged = merge_tensor(pieces, self.table[name], self.cfg.model.vocab_size)
        if merged.shape != self.shapes[name]:
            raise CheckpointError(f"{self.path}: {name} has shape {tuple(merged.shape)} in the files, the model in "
                                  f"{CONFIG} has {tuple(self.shapes[name])}; the config does not match the weights")
        return merged

    def items(self, kind: str = "fp32") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name, kind)


class _PipelineLayerFile:
    """One stage layer's weights of one TP rank, as DeepSpeed's PipelineEngine saved them."""

    def __init__(self, path: Path):
        self.path = path
        self.state = _mapped(path)

    def names(self) -> list[str]:
        return list(self.state)

    def tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """The weights (Adam's state of a pipe checkpoint is in its ZeRO files, not here)."""
        stored = self.state[name]
        out = stored.float().clone()
        release_pages(stored)
        return out
