"""`parallel.mode: pipe_zero3`: ZeRO-3 inside pipeline stages (see runtime.py); p2p.py moves
activations between stages; ds_internals.py holds the DeepSpeed internals this mode adjusts."""
