"""The typed schema of params.yaml, with NeMo-Aligner's key names, Hydra-style overrides and validation.

    harness config show model.spin.use_meta_judge=true model.spin.meta_judge_pcnt=0.1

Defaults live here and only here (dataclass defaults = NeMo-Aligner's gpt_self_rewarding.yaml where they make sense);
params.yaml scales them down for the embedded default. This module must not import torch.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key path."""


# ----------------------------------------------------------------------------------------------------- schema
@dataclass
class TrtLlm:
    enable: bool = False  # TensorRT-LLM has no PyPI wheel; true is refused with a pointer to README


@dataclass
class SelfRewardingTrainer:
    max_iterations: int = 3
    max_epochs: int = 1
    max_steps: int = -1  # -1: one pass (max_epochs) over the iteration's pairs
    val_check_interval: float = 0.1  # < 1: fraction of an iteration's steps; >= 1: every that many steps
    save_interval: int = 100
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    gradient_clip_val: float = 1.0
    trt_llm: TrtLlm = field(default_factory=TrtLlm)


@dataclass
class Trainer:
    precision: str = "32"  # "32" (fp32) or bf16 (bf16 compute over fp32 weights); fp32 keeps CPU reruns bit-identical
    devices: int = 1  # processes per node (torchrun --nproc_per_node): data parallel x tensor parallel
    num_nodes: int = 1
    accelerator: str = "auto"  # auto (cuda when present) | cpu | gpu
    self_rewarding: SelfRewardingTrainer = field(default_factory=SelfRewardingTrainer)


@dataclass
class ExpManager:
    explicit_log_dir: str | None = None
    exp_dir: str | None = None
    name: str = "self_rewarding"


@dataclass
class PretrainedCheckpoint:
    restore_from_path: str | None = None  # None: build the tiny embedded model (see model.tiny)


@dataclass
class Sched:
    name: str = "CosineAnnealing"
    warmup_steps: int = 10
    constant_steps: int = 1000
    min_lr: float = 9e-7


@dataclass
class Optim:
    name: str = "distributed_fused_adam"  # every Adam variant maps to torch AdamW on this backend
    lr: float = 9e-6
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    sched: Sched = field(default_factory=Sched)


@dataclass
class LengthParams:
    max_length: int = 2048
    min_length: int = 1


@dataclass
class SamplingParams:
    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    end_strings: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<extra_id_1>"])


@dataclass
class Spin:
    ref_policy_kl_penalty: float | list[float] = 0.1  # DPO beta; scalar or one value per iteration
    num_responses_to_gen: int = 4
    num_evals_to_average: int = 3
    use_meta_judge: bool = False
    meta_judge_pcnt: float = -1.0  # required in [0, 1] when use_meta_judge
    meta_max_relative_pcnt: float = 0.4
    length_control: float | list[float] = 0.0  # rho; scalar or one value per iteration
    preference_loss: str = "dpo"
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    gt_reward_scale: float = 1.0
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool | None = None  # None: same as preference_average_log_probs
    first_iteration_sft: bool = False
    require_pairs: bool = False  # an iteration with no usable preference pair: false = loud warning, true = error
    judge_score_low: float = 0.0
    judge_score_high: float = 5.0
    judge_template: str = "paper"  # paper (verbatim prompts of the papers) | compact (short rubric for tiny models)
    llm_judge_prompt: str | None = None  # Jinja2 text replacing the judge template (NeMo-Aligner key)
    llm_meta_judge_prompt: str | None = None
    judge_reward_regex: str = "(?i)(?:Score|Points): {{ reward }}"
    meta_judge_reward_regex: str = "(?i)Winner: (?:Judgement|Judgment) {{ reward }}"
    rollout_micro_batch_size: int = 32
    # Task world only: oracle labels are the ceiling of DPO on the iteration's samples, random labels the floor.
    pair_labels: str = "judge"  # judge | oracle | random
    cream: str = "none"  # CREAM consistency regularization (arXiv 2410.12735): none | avg | dyn
    length_params: LengthParams = field(default_factory=LengthParams)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class ChatPromptTokens:
    system_turn_start: str = "<extra_id_0>"
    turn_start: str = "<extra_id_1>"
    label_start: str = "<extra_id_2>"
    end_of_turn: str = "\n"
    end_of_name: str = "\n"


@dataclass
class Dataset:
    file_path: str | list[str] | None = None  # train_ds: a list gives fresh prompts per iteration
    max_seq_length: int = 4096
    shuffle: bool = True


@dataclass
class Data:
    prompt_format: str = "nemo"  # nemo (NeMo turn tokens) | hf_chat_template (the tokenizer's chat template)
    chat_prompt_tokens: ChatPromptTokens = field(default_factory=ChatPromptTokens)
    train_ds: Dataset = field(default_factory=Dataset)
    validation_ds: Dataset = field(default_factory=Dataset)
    sft_ds: Dataset = field(default_factory=Dataset)  # iteration 0 gold answers (IFT); default: train_ds
    judge_train_ds: Dataset = field(default_factory=Dataset)  # iteration 0 judge training (EFT), optional


@dataclass
class Tiny:
    """Architecture of the embedded Llama model built when pretrained_checkpoint.restore_from_path is null."""

    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 384
    vocab_size: int = 512


@dataclass
class SftStage:
    """Iteration 0 (first_iteration_sft): supervised training on gold answers (IFT) and judge data (EFT)."""

    max_epochs: int = 1
    lr: float = 9e-6  # its own key (not model.optim.lr): a model trained from scratch needs a far larger one
    baseline: bool = True  # task world: also train the IFT-only "SFT baseline" and report win rates against it


@dataclass
class Model:
    backend: str = "hf"  # hf (transformers) | mcore (megatron-core GPTModel)
    tensor_model_parallel_size: int = 1  # mcore only; data parallel = devices x num_nodes / this
    pipeline_model_parallel_size: int = 1  # must be 1: no pipeline parallelism here
    micro_batch_size: int = 1
    global_batch_size: int = 64
    encoder_seq_length: int = 4096
    optim: Optim = field(default_factory=Optim)
    spin: Spin = field(default_factory=Spin)
    data: Data = field(default_factory=Data)
    tiny: Tiny = field(default_factory=Tiny)
    sft: SftStage = field(default_factory=SftStage)


@dataclass
class World:
    """The synthetic task world of the embedded default (harness/data/world.py)."""

    num_ift: int = 300  # IFT seed: prompts with gold answers (kept small so M1 is imperfect)
    num_eft: int = 600  # EFT seed: judge prompts over responses of every quality level
    num_mft: int = 300  # meta-judge seed: two judgements (one true to the oracle), target "Winner: Judgement A|B"
    prompts_per_iteration: int = 64  # fresh prompts per self-rewarding iteration
    num_validation: int = 64
    num_test: int = 128


@dataclass
class Tracking:
    enabled: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment_name: str = "self-rewarding"
    log_model: bool = False


@dataclass
class Config:
    seed: int = 1234
    trainer: Trainer = field(default_factory=Trainer)
    exp_manager: ExpManager = field(default_factory=ExpManager)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: Model = field(default_factory=Model)
    world: World = field(default_factory=World)
    tracking: Tracking = field(default_factory=Tracking)


# Keys that only mean something to Megatron/NeMo launchers: accepted, reported once, never fatal.
LAUNCHER_ONLY = (
    "trainer.logger", "trainer.enable_checkpointing",
    "trainer.use_distributed_sampler", "trainer.self_rewarding.trt_llm.max_input_len",
    "trainer.self_rewarding.trt_llm.generation_batch_size", "trainer.self_rewarding.trt_llm.*",
    "exp_manager.create_wandb_logger", "exp_manager.wandb_logger_kwargs.*", "exp_manager.resume_from_checkpoint",
    "exp_manager.checkpoint_callback_params.*", "exp_manager.resume_if_exists",
    "exp_manager.resume_ignore_no_checkpoint", "exp_manager.create_checkpoint_callback", "model.data.chat",
    "model.spin.sampling_params.add_BOS", "model.spin.sampling_params.all_probs",
    "model.spin.sampling_params.compute_logprob", "exp_manager.log_step_timing", "exp_manager.create_tensorboard_logger",
    "model.mcore_gpt", "model.megatron_amp_O2", "model.sequence_parallel", "model.apply_rope_fusion",
    "model.precision",
    "model.activations_checkpoint_granularity", "model.activations_checkpoint_method",
    "model.activations_checkpoint_num_layers", "model.gradient_as_bucket_view", "model.bias_activation_fusion",
    "model.masked_softmax_fusion", "model.dist_ckpt_*", "model.optim.bucket_cap_mb", "model.optim.overlap_grad_sync",
    "model.optim.overlap_param_sync", "model.optim.contiguous_grad_buffer", "model.optim.contiguous_param_buffer",
    "model.spin.offload_adam_states", "model.spin.trt_llm.*",
    "model.data.*_ds.min_seq_length", "model.data.*_ds.drop_last", "model.data.*_ds.label_key",
    "model.data.*_ds.add_eos", "model.data.*_ds.add_sep", "model.data.*_ds.add_bos", "model.data.*_ds.truncation_field",
    "model.data.*_ds.prompt_template", "model.data.*_ds.hf_dataset", "model.data.*_ds.truncation_method",
    "model.data.*_ds.index_mapping_dir", "model.data.*_ds.num_workers", "model.data.*_ds.memmap_workers",
    "model.data.*_ds.pin_memory", "model.data.*_ds.micro_batch_size", "model.data.*_ds.global_batch_size",
    "model.data.*_ds.output_original_text",
)
PATHS = ("pretrained_checkpoint.restore_from_path", "exp_manager.explicit_log_dir", "exp_manager.exp_dir",
         "tracking.tracking_uri", *(f"model.data.{d}.file_path" for d in ("train_ds", "validation_ds", "sft_ds",
                                                                          "judge_train_ds")))
MIN_TINY_VOCAB = 262  # models/tokenizer.py: the 256 byte tokens + 6 special tokens (BOS, EOS, PAD, 3 chat turns)
PRECISIONS = ("32", "bf16", "bf16-mixed")  # bf16*: bf16 compute over fp32 weights (models.base.Policy.autocast)
PAIR_LABELS = ("judge", "oracle", "random")
CREAM_MODES = ("none", "avg", "dyn")
PREFERENCE_LOSSES = ("dpo", "scale", "rpo_bwd_kl", "rpo_fwd_kl", "ipo", "rpo_sq")
SCHEDULES = ("model.spin.ref_policy_kl_penalty", "model.spin.length_control")


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


def _is_prefix(key: str, valid: set[str]) -> bool:
    return any(v.startswith(key + ".") for v in valid)


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, "", [])
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------- checks
def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    sr, spin, m = cfg.trainer.self_rewarding, cfg.model.spin, cfg.model
    _check(sr.max_iterations >= 1, f"trainer.self_rewarding.max_iterations: must be >= 1, got {sr.max_iterations}")
    _check(sr.max_epochs >= 1, f"trainer.self_rewarding.max_epochs: must be >= 1, got {sr.max_epochs}")
    _check(sr.max_steps == -1 or sr.max_steps >= 1, "trainer.self_rewarding.max_steps: -1 or >= 1")
    _check(sr.val_check_interval > 0, "trainer.self_rewarding.val_check_interval: must be > 0")
    _check(0 < sr.limit_train_batches <= 1, "trainer.self_rewarding.limit_train_batches: must be in (0, 1]")
    _check(0 <= sr.limit_val_batches <= 1, "trainer.self_rewarding.limit_val_batches: must be in [0, 1]")
    _check(sr.gradient_clip_val >= 0, "trainer.self_rewarding.gradient_clip_val: must be >= 0")
    _check(sr.save_interval >= 1, f"trainer.self_rewarding.save_interval: must be >= 1, got {sr.save_interval}")
    _check(not sr.trt_llm.enable, "trainer.self_rewarding.trt_llm.enable: TensorRT-LLM is not installable from PyPI; "
           "set it to false (see README: GPU backends)")
    _check(cfg.trainer.precision in PRECISIONS,
           f"trainer.precision: one of {', '.join(PRECISIONS)}, got {cfg.trainer.precision!r}"
           + (" (fp16 needs a loss scaler, which this harness does not build: use bf16)"
              if cfg.trainer.precision in ("16", "16-mixed") else ""))
    _check(cfg.trainer.devices >= 1, f"trainer.devices: must be >= 1, got {cfg.trainer.devices}")
    _check(cfg.trainer.num_nodes >= 1, f"trainer.num_nodes: must be >= 1, got {cfg.trainer.num_nodes}")
    _check(cfg.trainer.accelerator in ("auto", "cpu", "gpu", "cuda"),
           f"trainer.accelerator: one of auto, cpu, gpu, got {cfg.trainer.accelerator!r}")
    tp = cfg.model.tensor_model_parallel_size
    _check(tp >= 1, f"model.tensor_model_parallel_size: must be >= 1, got {tp}")
    _check(tp == 1 or cfg.model.backend == "mcore", f"model.tensor_model_parallel_size={tp}: needs model.backend=mcore")
    _check((cfg.trainer.devices * cfg.trainer.num_nodes) % tp == 0,
           f"model.tensor_model_parallel_size={tp}: must divide trainer.devices x trainer.num_nodes "
           f"({cfg.trainer.devices * cfg.trainer.num_nodes})")
    _check(cfg.model.pipeline_model_parallel_size == 1,
           "model.pipeline_model_parallel_size: must be 1 (no pipeline parallelism here; use tensor parallelism)")
    _check(m.micro_batch_size >= 1, f"model.micro_batch_size: must be >= 1, got {m.micro_batch_size}")
    _check(m.global_batch_size >= m.micro_batch_size and m.global_batch_size % m.micro_batch_size == 0,
           f"model.global_batch_size: must be a multiple of model.micro_batch_size ({m.micro_batch_size}), "
           f"got {m.global_batch_size}")
    _check(m.backend in ("hf", "mcore"), f"model.backend: one of hf, mcore, got {m.backend!r}")
    _check(m.optim.lr > 0, f"model.optim.lr: must be > 0, got {m.optim.lr}")
    _check(len(m.optim.betas) == 2 and all(0 <= b < 1 for b in m.optim.betas),
           f"model.optim.betas: two numbers in [0, 1), got {m.optim.betas}")
    _check(m.optim.sched.name in ("CosineAnnealing", "constant"),
           f"model.optim.sched.name: one of CosineAnnealing, constant, got {m.optim.sched.name!r}")
    _check(m.sft.max_epochs >= 1, "model.sft.max_epochs: must be >= 1")
    _check(m.sft.lr > 0, f"model.sft.lr: must be > 0, got {m.sft.lr}")
    _check(0 <= m.optim.sched.min_lr <= m.optim.lr, f"model.optim.sched.min_lr: must be in [0, model.optim.lr], got "
           f"model.optim.sched.min_lr={m.optim.sched.min_lr} and model.optim.lr={m.optim.lr}")
    _check(m.optim.sched.warmup_steps >= 0, "model.optim.sched.warmup_steps: must be >= 0")
    _check(m.optim.sched.constant_steps >= 0, "model.optim.sched.constant_steps: must be >= 0")
    _check(m.optim.eps > 0, f"model.optim.eps: must be > 0, got {m.optim.eps}")
    _check(m.optim.weight_decay >= 0, f"model.optim.weight_decay: must be >= 0, got {m.optim.weight_decay}")
    _check(m.encoder_seq_length >= 2, f"model.encoder_seq_length: must be >= 2, got {m.encoder_seq_length}")
    _check(spin.preference_loss in PREFERENCE_LOSSES,
           f"model.spin.preference_loss: one of {', '.join(PREFERENCE_LOSSES)}, got {spin.preference_loss!r}")
    _check(spin.num_responses_to_gen >= 2, "model.spin.num_responses_to_gen: must be >= 2 (a pair needs two)")
    _check(spin.num_evals_to_average >= 1, "model.spin.num_evals_to_average: must be >= 1")
    for k in ("preference_loss_weight", "sft_loss_weight", "gt_reward_scale"):
        _check(getattr(spin, k) >= 0, f"model.spin.{k}: must be >= 0, got {getattr(spin, k)}")
    _check(spin.judge_score_low < spin.judge_score_high,
           f"model.spin.judge_score_low ({spin.judge_score_low}) must be < model.spin.judge_score_high "
           f"({spin.judge_score_high})")
    # Checked whether used or not: a sweep over an unused key must not silently run trials that change nothing.
    _check(spin.meta_judge_pcnt == -1 or 0 <= spin.meta_judge_pcnt <= 1,
           f"model.spin.meta_judge_pcnt: must be in [0, 1] (or -1, unset), got {spin.meta_judge_pcnt}")
    if spin.use_meta_judge:
        _check(0 <= spin.meta_judge_pcnt <= 1,
               f"model.spin.meta_judge_pcnt: must be in [0, 1] when model.spin.use_meta_judge=true, "
               f"got {spin.meta_judge_pcnt}")
        _check(spin.num_evals_to_average >= 2, "model.spin.num_evals_to_average: must be >= 2 for the meta-judge")
    _check(0 < spin.meta_max_relative_pcnt <= 1, "model.spin.meta_max_relative_pcnt: must be in (0, 1]")
    _check(spin.judge_template in ("paper", "compact"),
           f"model.spin.judge_template: one of paper, compact, got {spin.judge_template!r}")
    _check_judging(spin)
    _check(spin.pair_labels in PAIR_LABELS,
           f"model.spin.pair_labels: one of {', '.join(PAIR_LABELS)}, got {spin.pair_labels!r}")
    _check(spin.pair_labels == "judge" or uses_task_world(cfg),
           f"model.spin.pair_labels={spin.pair_labels} needs the task world's oracle: it is refused with "
           "model.data.train_ds.file_path set (use judge)")
    _check(spin.cream in CREAM_MODES, f"model.spin.cream: one of {', '.join(CREAM_MODES)}, got {spin.cream!r}")
    _check(spin.rollout_micro_batch_size >= 1, "model.spin.rollout_micro_batch_size: must be >= 1")
    lp, sp = spin.length_params, spin.sampling_params
    _check(1 <= lp.max_length, "model.spin.length_params.max_length: must be >= 1")
    _check(0 <= lp.min_length <= lp.max_length, "model.spin.length_params.min_length: must be in [0, max_length]")
    _check(sp.temperature > 0, f"model.spin.sampling_params.temperature: must be > 0, got {sp.temperature}")
    _check(sp.top_k >= 0, "model.spin.sampling_params.top_k: must be >= 0 (0 = off)")
    _check(0 < sp.top_p <= 1, f"model.spin.sampling_params.top_p: must be in (0, 1], got {sp.top_p}")
    _check(sp.repetition_penalty > 0, "model.spin.sampling_params.repetition_penalty: must be > 0")
    for key in SCHEDULES:
        value = get(cfg, key)
        if isinstance(value, list):
            _check(len(value) >= sr.max_iterations,
                   f"{key}: a per-iteration list needs one value per iteration "
                   f"(trainer.self_rewarding.max_iterations={sr.max_iterations}), got {len(value)}: {value}")
    for i, beta in enumerate(_as_list(spin.ref_policy_kl_penalty)):
        _check(beta > 0, f"model.spin.ref_policy_kl_penalty[{i}]: must be > 0, got {beta}")
    for i, rho in enumerate(_as_list(spin.length_control)):
        _check(0 <= rho <= 1, f"model.spin.length_control[{i}]: must be in [0, 1], got {rho}")
    tfp = m.data.train_ds.file_path
    if isinstance(tfp, list):
        _check(len(tfp) >= sr.max_iterations,
               f"model.data.train_ds.file_path: a per-iteration list needs {sr.max_iterations} paths, got {len(tfp)}")
    _check(m.data.prompt_format in ("nemo", "hf_chat_template"),
           f"model.data.prompt_format: one of nemo, hf_chat_template, got {m.data.prompt_format!r}")
    for name in ("train_ds", "validation_ds", "sft_ds", "judge_train_ds"):
        _check(getattr(m.data, name).max_seq_length >= 2,
               f"model.data.{name}.max_seq_length: must be >= 2 (a prompt token and a response token)")
    for key in PATHS:
        for i, v in enumerate(_as_list(get(cfg, key))):
            # Path("") is ".", which would be reported as ".: file not found" far from the key that held it.
            _check(v is None or v.strip() != "", f"{key}{f'[{i}]' if isinstance(get(cfg, key), list) else ''}: "
                   "empty path (use null for none)")
    t = m.tiny
    for k in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        _check(getattr(t, k) >= 1, f"model.tiny.{k}: must be >= 1, got {getattr(t, k)}")
    _check(t.vocab_size >= MIN_TINY_VOCAB, f"model.tiny.vocab_size: must be >= {MIN_TINY_VOCAB} (256 bytes and the "
           f"special tokens of the embedded tokenizer), got {t.vocab_size}")
    _check(t.hidden_size % t.num_attention_heads == 0, "model.tiny.hidden_size: must be a multiple of num_attention_heads")
    _check(t.hidden_size // t.num_attention_heads % 2 == 0,
           "model.tiny.hidden_size: hidden_size / num_attention_heads must be even (rotary embeddings rotate pairs)")
    _check(t.num_attention_heads % t.num_key_value_heads == 0,
           "model.tiny.num_key_value_heads: must divide num_attention_heads")
    for k in ("num_ift", "prompts_per_iteration", "num_validation", "num_test"):
        _check(getattr(cfg.world, k) >= 1, f"world.{k}: must be >= 1")
    for k in ("num_eft", "num_mft"):
        _check(getattr(cfg.world, k) >= 0, f"world.{k}: must be >= 0")
    _check(0 <= cfg.seed < 2**63, f"seed: must be in [0, 2^63), got {cfg.seed}")


def _check_judging(spin: Spin) -> None:
    """Judge templates and reward regexes compile, at load time: never after a stage has generated for minutes."""
    from harness.judging.parse import parse_score, parse_winner
    from harness.judging.templates import TemplateError, check_template

    for key, parse in (("judge_reward_regex", lambda r: parse_score("", 0, 1, r)),
                       ("meta_judge_reward_regex", lambda r: parse_winner("", r))):
        try:
            parse(getattr(spin, key))  # compiles the regex (a bad one raises ValueError; any text never does)
        except ValueError as e:
            raise ConfigError(f"model.spin.{key}: {e}") from None
    for key, kind in (("llm_judge_prompt", "judge"), ("llm_meta_judge_prompt", "meta_judge")):
        if getattr(spin, key) is not None:
            try:
                check_template(getattr(spin, key), kind, f"model.spin.{key}")
            except TemplateError as e:
                raise ConfigError(str(e)) from None


def uses_task_world(cfg: Config) -> bool:
    """The embedded task world (prompts, gold answers, the oracle) is used when no prompts file is configured (a
    user checkpoint can still be trained on the world's prompts)."""
    return cfg.model.data.train_ds.file_path is None


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


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
