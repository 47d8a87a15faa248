"""The errors a user can fix. The CLI catches `UserError` and prints its message as one line
(exit code 2); anything else is a bug and keeps its traceback.

Each message names the field, file or value at fault and says what to do instead.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of every problem a user can fix; the message names what is wrong and the fix."""


class ConfigError(UserError, ValueError):
    """A run config (YAML, --set, DeepSpeed template) that cannot work."""


class DataError(UserError, ValueError):
    """Bad or missing input data; the message names the file (and line/key) and the fix."""


class LaunchError(UserError, RuntimeError):
    """The launcher's environment does not say how to reach rank 0; the message says what to set."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that is missing, incomplete, or for another model or layout."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced too many non-finite losses or gradients in a row; the newest good checkpoint is named."""
