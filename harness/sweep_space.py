"""The search-space file of `harness sweep`: parsed and fully checked before any trial starts.

    space, cfg = load_space("experiments/sweep.yaml", "params.yaml")

Every field is type-checked and named in errors (`space.yaml: sampler.n_startup_trials: expected int, got '4'`);
sampler and pruner arguments are checked against Optuna's signatures and built once; every distribution's bounds
are loaded through the config schema, each param moved alone from the first values, so a refusal names the param
whose value caused it; the objective's metric and iteration are checked against what `harness evaluate` writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import config
from harness.io import DataError, read_text

DISTRIBUTIONS = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "threshold", "none")
SPACE_KEYS = ("study_name", "storage", "n_trials", "timeout", "n_jobs", "seed", "sampler", "pruner", "objective",
              "overrides", "params")
X = "x"  # the placeholder in a per-iteration template: [0, 0, x]


class SweepError(config.ConfigError):
    """A bad search-space file or a sweep that cannot start; the message names the file and key."""


# ----------------------------------------------------------------------------------------------------- space
@dataclass
class Param:
    key: str  # config key path, e.g. model.spin.length_control
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    template: list | None = None  # per-iteration list, X wherever the sampled value goes

    def suggest(self, trial):
        if self.type == "float":
            v = trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        elif self.type == "int":
            v = trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        else:
            v = trial.suggest_categorical(self.key, self.choices)
        return self.value(v)

    def value(self, v):
        return [v if e == X else e for e in self.template] if self.template is not None else v


@dataclass
class Space:
    path: str
    study_name: str
    storage: str = "sqlite:///optuna.db"
    n_trials: int = 8
    timeout: float | None = None
    n_jobs: int = 1
    seed: int = 0
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    metric: str | None = None  # None: eval/win_rate_vs_m1 with the task world's oracle, else eval/val_loss
    direction: str | None = None
    iteration: int | None = None  # None: the last iteration
    overrides: list[str] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)

    def objective(self, cfg: config.Config) -> tuple[str, str]:
        oracle = cfg.model.data.train_ds.file_path is None  # the embedded task world has an oracle
        metric = self.metric or ("eval/win_rate_vs_m1" if oracle else "eval/val_loss")
        direction = self.direction or ("minimize" if metric.endswith("loss") else "maximize")
        return metric, direction


def _err(path: str, key: str, msg: str) -> SweepError:
    return SweepError(f"{path}: {key}: {msg}")


def load_space(path: str | Path, base: str | None, overrides: list[str] = ()) -> tuple[Space, config.Config]:
    """Parse and fully validate a space file before any trial runs: every key, distribution and range, and the
    config at each distribution's bounds (so a range the schema refuses, e.g. meta_judge_pcnt up to 2, fails now)."""
    p = str(path)
    try:
        raw = yaml.safe_load(read_text(path)) or {}
    except DataError as e:
        raise SweepError(str(e).replace("file not found", "search-space file not found")) from None
    except yaml.YAMLError as e:
        raise SweepError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{p}: expected a mapping at the top level")
    for k in raw:
        if k not in SPACE_KEYS:
            raise _err(p, k, f"unknown key (allowed: {', '.join(SPACE_KEYS)})")

    def get(tree: dict, key: str, types: tuple, default, where: str = ""):
        v = tree.get(key)
        if v is None:
            return default
        if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
            names = " or ".join({int: "an integer", float: "a number", str: "a string", dict: "a mapping",
                                 list: "a list"}[t] for t in types if t is not int or float not in types)
            raise _err(p, where + key, f"expected {names}, got {v!r}")
        return v

    obj = get(raw, "objective", (dict,), {})
    for k in obj:
        if k not in ("metric", "direction", "iteration"):
            raise _err(p, f"objective.{k}", "unknown key (allowed: metric, direction, iteration)")
    if obj.get("direction") not in (None, "minimize", "maximize"):
        raise _err(p, "objective.direction", f"{obj['direction']!r} is not minimize or maximize")
    extra = get(raw, "overrides", (list,), [])
    for i, o in enumerate(extra):
        if not isinstance(o, str):
            raise _err(p, f"overrides[{i}]", f"expected a string like model.spin.use_meta_judge=true, got {o!r}")
    space = Space(path=p, study_name=str(get(raw, "study_name", (str, int), Path(path).stem)),
                  storage=get(raw, "storage", (str,), "sqlite:///optuna.db"), n_trials=get(raw, "n_trials", (int,), 8),
                  timeout=get(raw, "timeout", (int, float), None), n_jobs=get(raw, "n_jobs", (int,), 1),
                  seed=get(raw, "seed", (int,), 0), sampler=dict(get(raw, "sampler", (dict,), {"name": "tpe"})),
                  pruner=dict(get(raw, "pruner", (dict,), {"name": "median"})),
                  metric=get(obj, "metric", (str,), None, "objective."), direction=obj.get("direction"),
                  iteration=get(obj, "iteration", (int,), None, "objective."), overrides=[*extra, *overrides])
    for k in ("n_trials", "n_jobs"):
        if getattr(space, k) < 1:
            raise _err(p, k, f"must be >= 1, got {getattr(space, k)}")
    if space.timeout is not None and not 0 < space.timeout < math.inf:
        raise _err(p, "timeout", f"seconds, must be > 0, got {space.timeout}")
    if space.sampler.get("name") not in SAMPLERS:
        raise _err(p, "sampler.name", f"{space.sampler.get('name')!r} is not one of {', '.join(SAMPLERS)}")
    if space.pruner.get("name") not in PRUNERS:
        raise _err(p, "pruner.name", f"{space.pruner.get('name')!r} is not one of {', '.join(PRUNERS)}")
    _check_args(p, "sampler", space.sampler, lambda: make_sampler(space, 0))
    _check_args(p, "pruner", space.pruner, lambda: make_pruner(space))
    params = get(raw, "params", (dict,), None)
    if not isinstance(params, dict) or not params:
        raise _err(p, "params", "expected a mapping of config keys to distributions")
    valid = set(config.all_keys())
    for key, spec in params.items():
        where = f"params.{key}"
        if key not in valid:
            raise _err(p, where, f"unknown config key; did you mean {config.closest(key, sorted(valid))}?")
        if not isinstance(spec, dict):
            raise _err(p, where, "expected a mapping like {type: float, low: 0.01, high: 0.5}")
        allowed = {"type", "low", "high", "log", "step", "choices", "template"}
        for k in spec:
            if k not in allowed:
                raise _err(p, f"{where}.{k}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        typ = spec.get("type")
        if typ not in DISTRIBUTIONS:
            raise _err(p, f"{where}.type", f"unknown distribution {typ!r} (allowed: {', '.join(DISTRIBUTIONS)})")
        prm = Param(key=key, type=typ, low=spec.get("low"), high=spec.get("high"), log=bool(spec.get("log", False)),
                    step=spec.get("step"), choices=spec.get("choices"), template=spec.get("template"))
        if typ == "categorical":
            if not isinstance(prm.choices, list) or not prm.choices:
                raise _err(p, f"{where}.choices", "a categorical needs a non-empty list of choices")
            bounds = prm.choices
        else:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (prm.low, prm.high)):
                raise _err(p, where, f"a {typ} needs numeric low and high")
            if not prm.low < prm.high:
                raise _err(p, where, f"bad range: low={prm.low} must be < high={prm.high}")
            if prm.log and prm.low <= 0:
                raise _err(p, where, f"bad range: log scale needs low > 0 (got {prm.low})")
            if prm.log and prm.step is not None:
                raise _err(p, where, "log and step cannot be combined")
            bounds = [prm.low, prm.high]
        if prm.template is not None and (not isinstance(prm.template, list) or X not in prm.template):
            raise _err(p, f"{where}.template", f"a per-iteration list with {X!r} where the value goes, e.g. [0, 0, {X}]")
        space.params.append((prm, bounds))
    # The schema's own ranges (meta_judge_pcnt in [0,1], list lengths, ...): first every param at its first value,
    # then each other bound with only that param moved, so a refusal names the param whose value caused it.
    first = {prm.key: override(prm.key, prm.value(bounds[0])) for prm, bounds in space.params}
    try:
        cfg = config.load(base, [*space.overrides, *first.values()], warn=None)
    except config.ConfigError as e:
        key = next((k for k in first if re.match(rf"{re.escape(k)}\b", str(e))), None)
        where = f"params.{key}" if key else "overrides" if space.overrides else "params"
        raise _err(p, where, f"{first[key] if key else ', '.join(first.values())} is refused by the config: {e}"
                   ) from None
    for prm, bounds in space.params:
        for b in bounds[1:]:
            try:
                config.load(base, [*space.overrides, *{**first, prm.key: override(prm.key, prm.value(b))}.values()],
                       warn=None)
            except config.ConfigError as e:
                raise _err(p, f"params.{prm.key}", f"value {b!r} is refused by the config: {e}") from None
    space.params = [prm for prm, _ in space.params]
    _check_objective(space, cfg)
    return space, cfg


def _check_objective(space: Space, cfg: config.Config) -> None:
    """The objective's metric and iteration, before any trial: a typo must not cost a trial."""
    from harness.evaluate import eval_metrics

    metric, _ = space.objective(cfg)
    iters = config.self_rewarding_iterations(cfg)
    if space.iteration is not None and space.iteration not in iters:
        raise _err(space.path, "objective.iteration", f"{space.iteration} is not a self-rewarding iteration of this "
                   f"config (they are {', '.join(map(str, iters))})")
    for t in iters:  # every iteration reports the metric to the pruner
        names = eval_metrics(cfg, t)
        if metric not in names:
            raise _err(space.path, "objective.metric", f"{metric!r} is not written by `harness evaluate` at iteration "
                       f"{t} for this config{config.closest(metric, sorted(names))} (it writes: {', '.join(sorted(names))})")


def _check_args(path: str, what: str, spec: dict, build) -> None:
    """Sampler/pruner arguments by the types in the Optuna signature (which does not check them itself), then built
    once, so a bad value fails here, naming the field, not inside the first trial."""
    import inspect

    import optuna

    cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
           "median": optuna.pruners.MedianPruner, "threshold": optuna.pruners.ThresholdPruner,
           "none": optuna.pruners.NopPruner}[spec["name"]]
    sig = inspect.signature(cls.__init__).parameters
    simple = {"int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}
    for k, v in spec.items():
        if k == "name":
            continue
        if k == "seed" or k not in sig:
            allowed = ", ".join(a for a in sig if a not in ("self", "seed")) or "none"
            note = "; the sampler's seed is the space file's `seed`" if k == "seed" else ""
            raise _err(path, f"{what}.{k}", f"not an argument of {cls.__name__} (arguments: {allowed}){note}")
        ann = sig[k].annotation  # a type, or its text (modules with `from __future__ import annotations`)
        ann = ann.__name__ if isinstance(ann, type) else str(ann).replace(" ", "")
        if not all(a in simple for a in ann.split("|")):
            raise _err(path, f"{what}.{k}", f"{cls.__name__}'s {k} ({ann}) cannot be set from a file")
        ok = tuple(t for a in ann.split("|") for t in simple[a])
        if not isinstance(v, ok) or isinstance(v, bool) and bool not in ok:
            raise _err(path, f"{what}.{k}", f"expected {ann.replace('|', ' or ')}, got {v!r}")
    try:
        build()
    except (TypeError, ValueError) as e:
        raise _err(path, what, f"{cls.__name__} refuses {spec}: {e}") from None


def override(key: str, value) -> str:
    """A Hydra-style `key=value` that config.load parses back to exactly `value` (floats by repr, lists as [a,b])."""
    def fmt(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ",".join(fmt(e) for e in v) + "]"
        return config.quote(v) if isinstance(v, str) else str(v)

    return f"{key}={fmt(value)}"


def make_sampler(space: Space, worker_index: int):
    import optuna

    kw = {k: v for k, v in space.sampler.items() if k != "name"}
    seed = space.seed + 1000 * worker_index  # workers on one study must not draw the same startup points
    if space.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed, **kw)
    return optuna.samplers.TPESampler(seed=seed, **kw)


def make_pruner(space: Space):
    import optuna

    kw = {k: v for k, v in space.pruner.items() if k != "name"}
    name = space.pruner["name"]
    if name == "median":
        return optuna.pruners.MedianPruner(**kw)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**kw)
    return optuna.pruners.NopPruner()


def project_sqlite(url: str, repo: Path) -> str:
    """A relative sqlite URL (sqlite:///x.db) made absolute under the project, not the cwd: every worker and every
    trial worktree then opens the same file. Other URLs are returned as they are."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return f"sqlite:///{(repo / url[len('sqlite:///'):]).resolve()}"
    return url
