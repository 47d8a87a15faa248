"""`gptscale train` with pipeline stages: TP x PP x DP on DeepSpeed's PipelineEngine.

The loop, checkpoints, signals and metrics are the ZeRO-3 trainer's; what differs is how
the model is built (a PipelineModule of the GPT's stage layers), how a step runs (1F1B
over grad_accum micro-batches inside `train_batch`) and how validation runs (`eval_batch`).
"""
from __future__ import annotations

import sys

import torch

from gptscale.engine.pipeline import (StageTimer, bubble_warning, build_pipeline_module, canonical_parameters, idle_fractions_per_stage,
                                      theoretical_idle_fraction)
from gptscale.engine.schedule import lr_factor
from gptscale.engine.trainer import Trainer, _param_groups, _seed_all
from gptscale.engine.weights import load_canonical_params
from gptscale.model.pipe import stage_layers

LARGEST_SAMPLED_MODEL = 2_000_000_000  # parameters; bigger ones are not consolidated onto one rank for a sample


class PipelineTrainer(Trainer):
    mode = "pipe"

    def describe_mode(self) -> str:
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        return f"pipeline {self.cfg.parallel.pp} stages (1F1B, {self.cfg.train.grad_accum} micro-batches), ZeRO stage {stage}"

    def _build_engine(self) -> None:
        cfg, ds = self.cfg, self.deepspeed
        warning = bubble_warning(cfg)
        if warning and self.is_writer:
            print(f"gptscale: warning: {warning}", file=sys.stderr, flush=True)
        _seed_all(cfg.train.seed)  # every stage builds its layers from the same seed
        model = build_pipeline_module(cfg, self.topo, ds)
        self.layers = stage_layers(cfg.model, self.topo.tp_group)
        if cfg.train.init_from:
            load_canonical_params(canonical_parameters(model, self.layers), cfg.model, self.topo.tp_group,
                                  cfg.train.init_from, ds)
        self.engine, _, _, _ = ds.initialize(
            model=model, model_parameters=_param_groups(model, cfg.train.weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train)))
        self.timer = StageTimer(self.engine)
        _seed_all(cfg.train.seed + 1000 * self.topo.coords.dp + 1)

    def train_step(self, iterator, step: int) -> float:
        loss = self.engine.train_batch(iterator).item()  # already the mean over micro-batches and DP
        self.step_timing = self.timer.take()  # this step's alone, whenever it is logged
        return self._count_applied_step(loss, step)

    def step_metrics(self) -> dict:
        measured = idle_fractions_per_stage(*self.step_timing, self.topo)
        return {"pipe_idle_fraction": measured,
                "pipe_idle_theory": theoretical_idle_fraction(self.topo.layout.pp, self.cfg.train.grad_accum)}

    @torch.no_grad()
    def evaluate(self, held_out) -> float:
        loss = self.engine.eval_batch(iter(held_out), num_micro_batches=len(held_out))
        self.engine.train()
        self.timer.take()  # evaluation is not part of a training step's bubble
        return float(loss)

    def sample(self) -> str | None:
        return sample_from_final_checkpoint(self)


def sample_from_final_checkpoint(trainer: Trainer) -> str | None:
    """Generated on rank 0 from the final checkpoint, consolidated into one dense model."""
    from gptscale.engine.checkpoint import complete_checkpoints
    from gptscale.engine.sampling import generate_from_checkpoint
    from gptscale.model.counting import count_parameters

    final = complete_checkpoints(trainer.run_dir / "checkpoints")[-1]
    if not trainer.is_writer:
        return None
    if count_parameters(trainer.cfg.model).total > LARGEST_SAMPLED_MODEL:
        return f"(model too large to sample on one rank; run: gptscale generate {final})"
    t = trainer.cfg.train
    return generate_from_checkpoint(str(final), t.sample_prompt, max_new_tokens=t.sample_tokens,
                                    temperature=0.8, top_k=50, seed=t.seed)
