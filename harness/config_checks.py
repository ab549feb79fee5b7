"""Checks of a loaded config that one field's type cannot express: ranges, combinations, paths, judge templates and
regexes. Every message names the key path and the allowed range (harness.config.load runs them)."""

from __future__ import annotations

from typing import Any

from harness.config import get, uses_task_world
from harness.schema import (
    CREAM_MODES,
    END_MARKS,
    KIND_CHECKS,
    MIN_TINY_VOCAB,
    PAIR_LABELS,
    PATHS,
    PRECISIONS,
    PREFERENCE_LOSSES,
    SCHEDULES,
    Config,
    ConfigError,
    Spin,
)


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
    _check(cfg.world.end_marks in END_MARKS,
           f"world.end_marks: one of {', '.join(END_MARKS)}, got {cfg.world.end_marks!r}")
    _check(cfg.world.kind_check in KIND_CHECKS,
           f"world.kind_check: one of {', '.join(KIND_CHECKS)}, got {cfg.world.kind_check!r}")
    # Item-by-item judgements run to ~70 tokens (8 items listed); a shorter cap cuts them before their Score line.
    _check(cfg.world.kind_check != "items" or not uses_task_world(cfg) or m.spin.length_params.max_length >= 72,
           "world.kind_check=items writes judgements of up to ~70 tokens: model.spin.length_params.max_length must "
           f"be >= 72, got {m.spin.length_params.max_length}")
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


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]
