"""Command-line overrides of settings: `-s capture.top_k=32`, `-s students.0.lr=5e-4`, applied to the dict a TOML
file gives before it is validated (`pipeline.config.load_config`)."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

from .errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """'capture.top_k=32' -> (['capture', 'top_k'], 32)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. capture.top_k=32)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def merge_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict (a copy); sections are created as needed."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if isinstance(node, list):
                node = _list_item(node, part, text)
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        if isinstance(node, list):
            idx = _index(node, path[-1], text)
            node[idx] = value
        else:
            node[path[-1]] = value
    return out


def _index(items: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {text!r}: {part!r} is not an index of a list of {len(items)}")
    return int(part)


def _list_item(items: list, part: str, text: str) -> dict:
    item = items[_index(items, part, text)]
    if not isinstance(item, dict):
        raise ConfigError(f"override {text!r}: item {part} is a value, not a section")
    return item
