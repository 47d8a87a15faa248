"""The run modes behind one interface (base.Runtime): one module or package per mode, named by
the registry in gptscale.modes; plus what they share (the DeepSpeed config, the optimizer's
parameter groups and LR schedule, resident-memory accounting). Modes never import each other."""
