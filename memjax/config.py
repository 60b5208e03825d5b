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


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` as `scripts/train.py --config` does (locked), then
    applies `overrides` (`{"train.steps": 5}`); an unknown key or a wrong type raises."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_memjax_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        setattr(node, leaf, value)
    return config
