"""Options several commands share."""
from __future__ import annotations

import argparse


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (see configs/); omitted: the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set model.preset=llama-7b --set parallel.tp=8")
