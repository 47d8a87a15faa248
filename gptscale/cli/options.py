"""Options several commands share."""
from __future__ import annotations

import argparse


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (see configs/); omitted: the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set model.preset=llama-7b --set parallel.tp=8")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line ends like every other user error: one line on stderr
    ('gptscale: error: ...'), exit code 2 (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"gptscale: error: {self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value
