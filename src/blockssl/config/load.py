"""Coercion: YAML recipes (with ``base:``) and ``key=value`` overrides merged onto the defaults, every value checked
against its key's type, a run's saved configuration read back, and what may change when resuming it."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from blockssl.config.checks import validate
from blockssl.config.plan import plan
from blockssl.config.schema import Config, ConfigError


def _check(cfg: Config, saved: bool = False) -> None:
    """The cross-field checks, then the scheme's switches resolved together (``blockssl.config.plan``)."""
    validate(cfg, saved)
    plan(cfg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; return it converted (int -> float, str list)."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value is True or value is False:  # YAML reads true/false for "true"/"false" literals
            value = str(value).lower()
        if value not in choices:
            hint_text = _suggest(str(value), [str(c) for c in choices])
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}"
                              f"{hint_text}")
        return value
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write e.g. {key}=[1,2]")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        return _number(key, value, hint)
    if hint is str:
        if isinstance(value, bool | dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {hint!r} for {key}")


def _number(key: str, value: Any, kind: type[int] | type[float]) -> int | float:
    """An integer, or a finite number, from a YAML value or an override's text (booleans refused)."""
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    valid = isinstance(value, int) if kind is int else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not valid:
        raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    return kind(value)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply(node: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set ``values`` (a nested dict) on the dataclass ``node``, validating every key and value."""
    hints = _hints(type(node))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            valid = sorted(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown key {full!r}{_suggest(full, valid)}; valid keys here: {', '.join(valid)}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                example = next(iter(_hints(type(current))))
                raise ConfigError(f"{full}: is a section; set its keys, e.g. {full}.{example}=...")
            _apply(current, value, f"{full}.")
        else:
            setattr(node, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=0.1"`` -> ``{"train": {"lr": 0.1}}``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=10")
    key, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML recipe as nested values; ``base: other.yaml`` (relative to the file) is read first and overridden."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; recipes are in configs/")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    return _merge(read_recipe(path.parent / base, (*_seen, path.resolve())), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML recipe, then ``key=value`` overrides; validated."""
    values = read_recipe(path) if path is not None else {}
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg = Config()
    _apply(cfg, values)
    _check(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: dict[str, Any]) -> Config:
    """A saved configuration (a run's ``config.yaml``): validated, but a run made before a check existed still
    loads, with a warning, so that it can be evaluated and resumed as it was trained."""
    cfg = Config()
    _apply(cfg, values)
    _check(cfg, saved=True)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff_configs(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ, as ``key: a -> b`` lines."""
    out: list[str] = []

    def walk(x: dict[str, Any], y: dict[str, Any], prefix: str) -> None:
        for k in x:
            if isinstance(x[k], dict):
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x[k] != y[k]:
                out.append(f"{prefix}{k}: {x[k]!r} -> {y[k]!r}")

    walk(to_dict(a), to_dict(b), "")
    return out


def describe_keys() -> str:
    """Every key with its type and default, for ``--help``."""
    lines: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            hint = _hints(type(node))[f.name]
            kind = "|".join(map(str, get_args(hint))) if get_origin(hint) is Literal else getattr(
                hint, "__name__", str(hint))
            lines.append(f"  {prefix}{f.name} = {value!r}  ({kind})")

    walk(Config(), "")
    return "\n".join(lines)


# Keys that may change when resuming a run: they do not change what the model computes. The online probe never
# reaches the model, so it can be switched on (a fresh probe) or retuned for the rest of a run.
# What may change on resume: how, where and how visibly the same update is computed (execution strategies give the
# same update, tests/test_method.py and tests/test_pipeline.py).
RESUMABLE_KEYS = ("data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers",
                  "train.progress", "train.device", "train.log_every", "train.loggers", "train.execution",
                  "train.stages", "train.in_flight", "train.dist_timeout_s", "online_probe.enabled",
                  "online_probe.every",
                  "online_probe.lr", "online_probe.momentum", "online_probe.weight_decay")


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run's saved ``config.yaml`` with the overrides that do not change what is computed; others are an error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a blockssl run directory?")
    saved = yaml.safe_load(path.read_text())
    values = saved
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg, original = from_dict(values), from_dict(saved)
    cfg.out = str(run_dir)
    conflicts = [line for line in diff_configs(original, cfg)
                 if line.split(":")[0] not in (*RESUMABLE_KEYS, "out")]
    if conflicts:
        raise ConfigError("--resume: these overrides conflict with the run's config.yaml:\n  " + "\n  ".join(conflicts)
                          + f"\nonly {', '.join(RESUMABLE_KEYS)} may change; start a new run for the others")
    return cfg


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], sections: tuple[str, ...]) -> Config:
    """``key=value`` overrides on a run's config, limited to ``sections`` (evaluation may not change training)."""
    for text in overrides:
        override = parse_override(text)
        if set(override) - set(sections):
            raise ConfigError(f"{text!r}: only {', '.join(s + '.*' for s in sections)} keys can be set here")
        _apply(cfg, override)
    _check(cfg)
    return cfg
