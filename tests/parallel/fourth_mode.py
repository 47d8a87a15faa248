"""A fourth run mode, registered by a test, never by gptscale: TP x DP under DeepSpeed ZeRO
stage 1 or 2 (a plain DeepSpeedEngine; every rank keeps whole parameters).

It shows what adding a run mode takes: this one module and one registry entry (`SPEC`, which
a real mode would add to gptscale/modes.py). The loop, the config, the DeepSpeed config
assembly, checkpoints and consolidation pick it up through the registry unchanged.
"""
from gptscale import modes
from gptscale.model.gpt import GPT
from gptscale.runtime.base import WholeModelRuntime, seed_all

SPEC = modes.ModeSpec("zero12", "TP x DP, ZeRO stage 1 or 2 (a test's fourth mode)",
                      runtime="tests.parallel.fourth_mode:Zero12Runtime",
                      checkpoint_files=modes.CheckpointFiles.ONE_ZERO_ENGINE, pipeline=False,
                      default_template="pipe_zero1", zero_stages=(1, 2),
                      zero_stages_refusal=" keeps whole parameters on every rank; use a ZeRO stage 1 or 2 template")


def register() -> None:
    if SPEC.name not in modes.names():
        modes.register(SPEC)


class Zero12Runtime(WholeModelRuntime):
    @classmethod
    def describe(cls, cfg, ds_config) -> str:
        return f"ZeRO stage {ds_config['zero_optimization']['stage']}, whole parameters"

    def build(self):
        seed_all(self.cfg.train.seed)
        model = GPT(self.cfg.model, self.topo.tp_group)  # no zero.Init: whole parameters on every rank
        return self.initialize_engine(model, dict(model.named_parameters()), mpu=self.topo)
