"""The typed schema of params.yaml: NeMo-Aligner's key names as dataclasses, with their defaults, and the key lists
and allowed values the loader and the checks share. Defaults live here and only here (dataclass defaults =
NeMo-Aligner's gpt_self_rewarding.yaml where they make sense); harness.config loads, overrides and validates them.
This module must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CREAM_MODES", "ChatPromptTokens", "Config", "ConfigError", "Data", "Dataset", "ExpManager", "LAUNCHER_ONLY",
    "LengthParams", "MIN_TINY_VOCAB", "Model", "Optim", "PAIR_LABELS", "PATHS", "PRECISIONS", "PREFERENCE_LOSSES",
    "PretrainedCheckpoint", "SCHEDULES", "SamplingParams", "Sched", "SelfRewardingTrainer", "SftStage", "Spin",
    "Tiny", "Tracking", "Trainer", "TrtLlm", "UNIONS", "World",
]


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
    ref_policy_kl_penalty: Any = 0.1  # DPO beta; scalar or one value per iteration (UNIONS)
    num_responses_to_gen: int = 4
    num_evals_to_average: int = 3
    use_meta_judge: bool = False
    meta_judge_pcnt: float = -1.0  # required in [0, 1] when use_meta_judge
    meta_max_relative_pcnt: float = 0.4
    length_control: Any = 0.0  # rho; scalar or one value per iteration (UNIONS)
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
    file_path: Any = None  # str | list[str] | None (UNIONS); train_ds: a list gives fresh prompts per iteration
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
    end_marks: str = "symbols"  # symbols | names: how prompts and judgements say the end mark ("!" or "exclamation")
    kind_check: str = "whole"  # whole | items: the judgement's kind look at once, or item by item ("cat ok dgo bad")


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


# OmegaConf (2.3) structured configs cannot type a union of a scalar and a list: these fields are `Any` in the
# dataclasses above and harness.config coerces them to these types (per field name; each name is one key's or
# the four datasets').
UNIONS = {"ref_policy_kl_penalty": float | list[float], "length_control": float | list[float],
          "file_path": str | list[str] | None}
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
END_MARKS = ("symbols", "names")  # world.end_marks
KIND_CHECKS = ("whole", "items")  # world.kind_check
PAIR_LABELS = ("judge", "oracle", "random")
CREAM_MODES = ("none", "avg", "dyn")
PREFERENCE_LOSSES = ("dpo", "scale", "rpo_bwd_kl", "rpo_fwd_kl", "ipo", "rpo_sq")
SCHEDULES = ("model.spin.ref_policy_kl_penalty", "model.spin.length_control")
