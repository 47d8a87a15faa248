"""`python -m gptscale.cli` (what launchers run: torchrun ... -m gptscale.cli train ...)."""
import sys

from gptscale.cli import run

sys.exit(run())
