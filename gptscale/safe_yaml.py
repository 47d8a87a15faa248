"""YAML for files a user (or anyone) hands gptscale: safe_load, and stricter still.

Refused, with the line: aliases (`*name`; a few hundred bytes of nested aliases expand to
gigabytes: the "billion laughs"), and a key given twice in one mapping (YAML keeps the last
silently, so a second `train:` section would drop the first).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

from gptscale.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed here; write the value out",
                                       problem_mark=mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.MarkedYAMLError(problem="a key must be a plain value, not a list or mapping",
                                           problem_mark=key_node.start_mark) from None
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"key {key!r} appears twice in one mapping",
                                           problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str) -> Any:
    """Parse `text` (from `where`, named in the error) or raise a one-line ConfigError."""
    stream = io.StringIO(text)
    stream.name = where  # named in the error's position
    try:
        return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply to be a config") from None


def load_yaml_file(path: str | Path, where: str) -> Any:
    """The YAML document of the file `path`; a missing or unreadable file is one line naming `where`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} cannot be read: {exc}") from None
    return load_yaml(text, where)
