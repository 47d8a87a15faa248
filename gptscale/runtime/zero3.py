"""`parallel.mode: zero3`: TP x DP with DeepSpeed ZeRO stage 3 over the data-parallel group.

The model is built inside `deepspeed.zero.Init`, so no rank ever holds the whole model, and
the topology is handed to DeepSpeed as its `mpu`, so ZeRO partitions over the DP group
only. Steps, evaluation and sampling are those of any whole-model engine (runtime.base).
"""
from __future__ import annotations

from gptscale.model.compile import compile_blocks
from gptscale.model.gpt import GPT
from gptscale.runtime.base import WholeModelRuntime, seed_all


class Zero3Runtime(WholeModelRuntime):
    @classmethod
    def describe(cls, cfg, ds_config) -> str:
        return "ZeRO stage 3"

    def build(self):
        cfg, ds, topo = self.cfg, self.ctx.deepspeed, self.topo
        # Same seed on every rank while building: parameters are identical before ZeRO partitions them.
        seed_all(cfg.train.seed)
        with ds.zero.Init(config_dict_or_path=self.ctx.ds_config, mpu=topo,
                          data_parallel_group=topo.get_data_parallel_group()):
            model = GPT(cfg.model, topo.tp_group)
        compile_blocks(model, cfg.model)
        self.add_adapters([("", model)])  # partitioned when the engine is built
        return self.initialize_engine(model, dict(model.named_parameters()), mpu=topo)
