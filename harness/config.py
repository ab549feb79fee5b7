"""Loading params.yaml: NeMo/Hydra-style overrides onto the typed schema (harness.schema), validation
(harness.config_checks), and the accessors every stage uses.

    harness config show model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.1

Defaults live in harness.schema only; params.yaml scales them down for the embedded default. This module must not
import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from harness.schema import *  # noqa: F403 - the schema's names stay reachable as config.<Name>
from harness.schema import LAUNCHER_ONLY, Config, ConfigError, Dataset, Spin


def _is_launcher_only(path: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(path, pat) for pat in LAUNCHER_ONLY)


# ----------------------------------------------------------------------------------------------------- parsing
_NUMBER = re.compile(r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|nan)$")


def parse_value(text: str) -> Any:
    """A Hydra override value: numbers (1e-6 too, which PyYAML reads as a string), bools, null, lists, quoted."""
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    if _NUMBER.match(s):
        return int(s) if re.fullmatch(r"[+-]?\d+", s) else float(s)
    if s.startswith("[") and s.endswith("]"):
        inner = s[1:-1].strip()
        return [parse_value(p) for p in _split_list(inner)] if inner else []
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    return s


def _split_list(inner: str) -> list[str]:
    parts, depth, quote, cur = [], 0, None, ""
    for ch in inner:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def parse_override(text: str) -> tuple[str, str, Any]:
    """'++a.b=1' -> ('++', 'a.b', 1). Prefixes: '' (set existing), '+' (add), '++' (add or set), '~' (delete)."""
    m = re.match(r"^(\+\+|\+|~)?([A-Za-z_][\w.\-]*)(?:=(.*))?$", text, re.S)
    if not m or (m.group(3) is None and m.group(1) != "~"):
        raise ConfigError(f"override {text!r}: expected key=value, +key=value, ++key=value or ~key")
    return m.group(1) or "", m.group(2), (parse_value(m.group(3)) if m.group(3) is not None else None)


def _number_aware_yaml(obj: Any) -> Any:
    """PyYAML reads 9e-6 (no dot) as a string; YAML 1.2 and Hydra read it as a float."""
    if isinstance(obj, dict):
        return {k: _number_aware_yaml(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_number_aware_yaml(v) for v in obj]
    if isinstance(obj, str) and _NUMBER.match(obj.strip()) and "e" in obj.lower():
        return float(obj)
    return obj


# ----------------------------------------------------------------------------------------------------- building
def closest(path: str, candidates: list[str]) -> str:
    """The error-message tail naming the valid key nearest to `path` ("" when none is near); sweep specs use it too."""
    best = difflib.get_close_matches(path, candidates, n=1, cutoff=0.4)
    return f"; closest valid key: {best[0]}" if best else ""


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, path + ".")
        else:
            out.append(path)
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # A value of one arm's shape gets that arm's own message ("length_control[1]: expected a finite number"),
        # not "expected float | list[float]".
        if float in typing.get_args(tp) and isinstance(value, float) and not math.isfinite(value):
            return _coerce(path, value, float)
        if isinstance(value, list) and any(typing.get_origin(a) is list for a in typing.get_args(tp)):
            return _coerce(path, value, next(a for a in typing.get_args(tp) if typing.get_origin(a) is list))
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(path, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (arm,) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", v, arm) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if not -(2**63) <= value < 2**63:  # torch, numpy and sqlite (MLflow, Optuna) hold 64-bit integers
            raise ConfigError(f"{path}: {value} is out of the 64-bit integer range")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")  # an inf lr trains a NaN model
        return float(value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str, ignored: list[str]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            leaves = list(flatten(value, path + ".")) if isinstance(value, dict) and value else [path]
            bad = [leaf for leaf in leaves if not _is_launcher_only(leaf)]
            if bad:
                raise ConfigError(f"unknown config key {bad[0]}{closest(bad[0], all_keys())}")
            ignored.extend(leaves)
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, path + ".", ignored)
        else:
            kwargs[key] = _coerce(path, value, tp)
    return cls(**kwargs)


def _set(tree: dict, path: str, value: Any, op: str) -> None:
    parts = path.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if op == "~":
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load(path: str | Path | None = None, overrides: list[str] = (), *, warn=print) -> Config:
    """params.yaml (or defaults) + overrides -> a validated Config. Launcher-only keys are reported in one line."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        from harness.io import DataError, read_text

        try:
            tree = yaml.safe_load(read_text(p)) or {}
        except DataError as e:  # not UTF-8: the message names the line
            raise ConfigError(str(e)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        tree = _number_aware_yaml(tree)
    valid = set(all_keys())
    deleted = {}
    for text in overrides:
        op, key, value = parse_override(text)
        if op == "" and key not in valid and not _is_launcher_only(key) and not _is_prefix(key, valid):
            raise ConfigError(f"unknown config key {key} in override {text!r}{closest(key, sorted(valid))}")
        _set(tree, key, value, op)
        if op == "~":
            deleted[key] = text
    ignored: list[str] = []
    try:
        cfg = _build(Config, tree, "", ignored)
        validate(cfg)
    except ConfigError as e:
        # A deleted key falls back to its default; say so, or the message blames only the key it was checked with.
        notes = [f"{k} is at its default {get(Config(), k)!r} (deleted by {t!r})" for k, t in deleted.items()
                 if k in valid and re.search(rf"{re.escape(k)}\b", str(e))]
        raise ConfigError("; ".join([str(e), *notes])) from None
    if ignored and warn:
        warn(f"harness: not used by this backend (accepted, ignored): {', '.join(sorted(set(ignored)))}")
    return cfg


def validate(cfg: Config) -> None:
    """Ranges, combinations, paths and judge templates (harness.config_checks, which reads this module's accessors)."""
    from harness.config_checks import validate as check

    check(cfg)


def _is_prefix(key: str, valid: set[str]) -> bool:
    return any(v.startswith(key + ".") for v in valid)


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, "", [])
    validate(cfg)
    return cfg


def uses_task_world(cfg: Config) -> bool:
    """The embedded task world (prompts, gold answers, the oracle) is used when no prompts file is configured (a
    user checkpoint can still be trained on the world's prompts)."""
    return cfg.model.data.train_ds.file_path is None


def get(cfg: Any, path: str) -> Any:
    node = cfg
    for p in path.split("."):
        node = getattr(node, p)
    return node


def schedule(value: float | list[float], iteration: int) -> float:
    """The value of a scalar-or-per-iteration key (ref_policy_kl_penalty, length_control) at absolute iteration t.

    Iterations are counted as NeMo-Aligner does: 0 is the first iteration (the SFT one when first_iteration_sft).
    """
    if isinstance(value, list):
        if iteration >= len(value):
            raise ConfigError(f"iteration {iteration}: the per-iteration list {value} has no value for it")
        return float(value[iteration])
    return float(value)


def seq_len(cfg: Config, ds: Dataset) -> int:
    """Max tokens of a training or validation sequence: the dataset's max_seq_length within the model's context
    (model.encoder_seq_length); longer sequences lose the start of their prompt."""
    return min(ds.max_seq_length, cfg.model.encoder_seq_length)


def sft_average_log_probs(spin: Spin) -> bool:
    return spin.preference_average_log_probs if spin.sft_average_log_probs is None else spin.sft_average_log_probs


def self_rewarding_iterations(cfg: Config) -> list[int]:
    """Absolute iteration numbers that run self-rewarding (iteration 0 is SFT when first_iteration_sft)."""
    first = 1 if cfg.model.spin.first_iteration_sft else 0
    return list(range(first, cfg.trainer.self_rewarding.max_iterations))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)


def params_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
