"""Helpers for config files: `get_config(arg)` argument parsing and config <-> dict conversion."""

import ast

import ml_collections


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parses the `:`-argument of a config file, e.g. `"model=deltanet,smoke"`.

    Each comma-separated item is `key=value` (value parsed as a Python literal when it is one,
    otherwise kept as a string) or a bare `key`, which sets a boolean default to True.
    Only keys present in `defaults` are accepted, so a typo is an error naming the key.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
        if not has_value:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            values[key] = True
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if isinstance(defaults[key], bool) and not isinstance(value, bool):
            raise ValueError(f"config argument {key!r} is a flag; got {raw!r}")
        values[key] = value
    return values


def to_dict(config) -> dict:
    """A plain nested dict (tuples kept) of a ConfigDict, for JSON files and comparisons."""
    if isinstance(config, ml_collections.ConfigDict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
