"""The only package that imports deepspeed: config assembly, initialisation, the training
loop, checkpoints and metrics."""
