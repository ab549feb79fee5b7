"""Loading params.yaml: overrides parsed by Hydra's own override parser, applied to the file with Hydra's rules, the
result merged onto the schema (harness.schema) as an OmegaConf structured config, which types every value; then
the checks no type can say (harness.config_checks), and the accessors every stage uses. Errors name the full key
path, the closest valid key and the allowed range.

    harness config show model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.1

Defaults live in harness.schema only; params.yaml scales them down for the embedded default. This module must not
import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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
from harness.schema import LAUNCHER_ONLY, UNIONS, Config, ConfigError, Dataset, Spin


def _is_launcher_only(path: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(path, pat) for pat in LAUNCHER_ONLY)


# ----------------------------------------------------------------------------------------------------- parsing
# Overrides use Hydra's own grammar (the parser NeMo's launchers and `dvc exp run -S` use): prefixes, lists, dicts,
# quoting, escapes and ${interpolation} mean what they mean there.
_OPS = {"CHANGE": "", "ADD": "+", "FORCE_ADD": "++", "DEL": "~"}


@functools.cache
def _hydra_parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_override(text: str) -> tuple[str, str, Any]:
    """'++a.b=1' -> ('++', 'a.b', 1). Prefixes: '' (set existing), '+' (add), '++' (add or set), '~' (delete)."""
    from hydra.errors import HydraException

    try:
        ov = _hydra_parser().parse_override(text)
    except HydraException as e:
        reason = str(e).strip().splitlines()[-1]
        raise ConfigError(f"override {text!r}: expected key=value, +key=value, ++key=value or ~key, a value with "
                          f"characters other than letters, digits, spaces and /.-_+:$%*@?| in quotes ({reason})") from None
    if ov.is_sweep_override():
        raise ConfigError(f"override {text!r}: a sweep of values runs many configs (harness sweep); quote a value "
                          "that holds a comma: key='a,b'")
    if ov.package is not None:
        raise ConfigError(f"override {text!r}: @package applies to Hydra config groups; this config has none")
    return _OPS[ov.type.name], ov.key_or_group, ov.value()


def parse_value(text: str) -> Any:
    """A Hydra override value: numbers (1e-6 too, which PyYAML reads as a string), bools, null, lists, quoted."""
    return parse_override(f"value={text}")[2]


def quote(value: str) -> str:
    """`value` as a Hydra override value that parses back to itself: bare when it does, else single-quoted
    (Hydra escapes a quote, and the backslashes just before a quote or the end, with a backslash)."""
    try:
        if parse_value(value) == value:
            return value
    except ConfigError:
        pass
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


_NUMBER = re.compile(r"^[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|nan)$")


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
    """A value of one of the schema's UNIONS (OmegaConf cannot type them) to its declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # A value of one arm's shape gets that arm's own message ("length_control[1]: expected a finite number"),
        # not "expected float | list[float]".
        if float in typing.get_args(tp) and isinstance(value, float) and not math.isfinite(value):
            return _coerce(path, value, float)
        if isinstance(value, list):
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
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return _finite(path, value)
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{path}: expected a string, got {value!r}")


def _finite(path: str, value: float) -> float:
    if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")  # an inf lr trains a NaN model
    return float(value)


def _checked_tree(cls: type, data: Any, prefix: str, ignored: list[str]) -> dict:
    """`data` with launcher-only keys taken out (listed in `ignored`) and unknown keys refused with the closest valid
    key; leaf types and values are OmegaConf's (structured config) to check."""
    if data is None:  # an empty YAML section
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            leaves = list(flatten(value, path + ".")) if isinstance(value, dict) and value else [path]
            bad = [leaf for leaf in leaves if not _is_launcher_only(leaf)]
            if bad:
                raise ConfigError(f"unknown config key {bad[0]}{closest(bad[0], all_keys())}")
            ignored.extend(leaves)
        elif dataclasses.is_dataclass(hints[key]):
            out[key] = _checked_tree(hints[key], value, path + ".", ignored)
        else:
            if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
                _finite(path, value)  # OmegaConf's float() of a huge integer is an OverflowError naming no key
            out[key] = value
    return out


def _checked_numbers(obj: Any, prefix: str = "") -> None:
    """What one field's type cannot say: integers fit 64 bits, floats are finite, UNIONS hold one of their arms."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        path, value, tp = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            _checked_numbers(value, path + ".")
        elif f.name in UNIONS:
            setattr(obj, f.name, _coerce(path, value, UNIONS[f.name]))
        elif tp is int and not -(2**63) <= value < 2**63:  # torch, numpy and sqlite (MLflow, Optuna) hold 64 bits
            raise ConfigError(f"{path}: {value} is out of the 64-bit integer range")
        elif tp is float:
            _finite(path, value)
        elif tp == list[float]:
            for i, v in enumerate(value):
                _finite(f"{path}[{i}]", v)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _leaf_type(path: str) -> Any:
    tp: Any = Config
    for part in re.sub(r"\[\d+\]$", "", path).split("."):
        tp = typing.get_type_hints(tp)[part]
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is types.UnionType else [tp]
    tp = arms[0] if len(arms) == 1 else tp
    return typing.get_args(tp)[0] if path.endswith("]") and typing.get_origin(tp) is list else tp


def _omegaconf_error(e: Exception) -> ConfigError:
    """OmegaConf's error as ours: the full key path, what it expects, the value given."""
    from omegaconf.errors import InterpolationResolutionError, ValidationError

    key = getattr(e, "full_key", "") or "<root>"
    if isinstance(e, ValidationError) and not isinstance(e, InterpolationResolutionError):
        try:
            tp = _leaf_type(key)
        except (KeyError, TypeError):
            tp = None
        if tp is not None:
            expected = "a list" if typing.get_origin(tp) is list else _EXPECTED.get(tp, _type_name(tp))
            return ConfigError(f"{key}: expected {expected}, got {getattr(e, 'value', None)!r}")
    return ConfigError(f"{key}: {str(getattr(e, 'msg', e)).strip().splitlines()[0]}")


@functools.cache
def _structured() -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.structured(Config)


def _compose(tree: Any, ignored: list[str]) -> Config:
    """A tree (file + overrides; ${interpolations} allowed) onto the structured schema -> a Config, checked."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(_structured(), _checked_tree(Config, tree, "", ignored))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    _checked_numbers(cfg)
    validate(cfg)
    return cfg


_ABSENT = object()


def _apply(tree: Any, text: str, valid: set[str]) -> None:
    """One override onto the file's tree, with Hydra's rules for each prefix (as `dvc exp run -S` applies them to
    params.yaml): key= sets a key of the schema, +key= adds one the file does not set, ++key= adds or sets, ~key
    deletes (back to the schema's default)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    op, key, value = parse_override(text)
    known = key in valid or _is_launcher_only(key) or any(v.startswith(key + ".") for v in valid)
    if op == "" and not known:
        raise ConfigError(f"unknown config key {key} in override {text!r}{closest(key, sorted(valid))}")
    present = OmegaConf.select(tree, key, default=_ABSENT, throw_on_resolution_failure=False)
    try:
        if op == "~":
            if present is _ABSENT and not known:
                raise ConfigError(f"override {text!r}: {key} is not in the config{closest(key, sorted(valid))}")
            if present is not _ABSENT and value is not None and value != present:
                raise ConfigError(f"override {text!r}: the value of {key} is {present!r}, not {value!r}")
            if present is not _ABSENT:
                parent, _, leaf = key.rpartition(".")
                del (OmegaConf.select(tree, parent) if parent else tree)[leaf]
        elif op == "+" and present not in (None, _ABSENT) and not isinstance(value, (dict, list)):
            raise ConfigError(f"override {text!r}: could not append, an item is already at {key} (++{key}=... "
                              "sets it)")
        else:
            OmegaConf.update(tree, key, value, merge=True, force_add=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {text!r}: {str(e.msg).strip().splitlines()[0]}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load(path: str | Path | None = None, overrides: list[str] = (), *, warn=print) -> Config:
    """params.yaml (or defaults) + overrides -> a validated Config. Launcher-only keys are reported in one line."""
    from omegaconf import OmegaConf

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
    if overrides:
        node = OmegaConf.create(tree)
        for text in overrides:
            _apply(node, text, valid)
            if text.startswith("~"):
                deleted[parse_override(text)[1]] = text
        tree = OmegaConf.to_container(node, resolve=False)
    ignored: list[str] = []
    try:
        cfg = _compose(tree, ignored)
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
