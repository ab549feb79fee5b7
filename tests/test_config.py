"""Config: round trip, the tutorial's override lines, and every bad-input case with its message and exit code."""

import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import config
from harness.cli import main

TERMINAL = """trainer.num_nodes=1 trainer.devices=8 model.micro_batch_size=1 model.global_batch_size=64
pretrained_checkpoint.restore_from_path=/path/to/megatron_gpt_sft.nemo
model.data.train_ds.file_path=/data/train_sft_format.jsonl model.data.validation_ds.file_path=/data/valid.jsonl
exp_manager.create_wandb_logger=false exp_manager.wandb_logger_kwargs.project=self_rewarding_training
exp_manager.wandb_logger_kwargs.name=self_rewarding_training exp_manager.explicit_log_dir=/results
++model.sequence_parallel=false ++model.apply_rope_fusion=false trainer.self_rewarding.max_iterations=3
trainer.self_rewarding.max_epochs=1 model.spin.ref_policy_kl_penalty=0.1 model.spin.use_meta_judge=false
model.spin.length_params.max_length=2048 model.data.train_ds.max_seq_length=4096""".split()

SLURM = """trainer.num_nodes=4 trainer.devices=8 pretrained_checkpoint.restore_from_path='/ckpt/megatron_gpt_sft.nemo'
model.data.train_ds.file_path=/data/train.jsonl model.data.validation_ds.file_path=/data/valid.jsonl
model.micro_batch_size=1 model.global_batch_size=64 exp_manager.explicit_log_dir=/results
exp_manager.create_wandb_logger=True exp_manager.wandb_logger_kwargs.name=run
exp_manager.wandb_logger_kwargs.project=proj trainer.self_rewarding.max_iterations=3
trainer.self_rewarding.max_epochs=1 model.spin.ref_policy_kl_penalty=0.1 model.spin.use_meta_judge=false
model.spin.length_params.max_length=2048 model.data.train_ds.max_seq_length=4096""".split()


def test_defaults_match_nemo_aligner():
    cfg = config.Config()
    assert cfg.model.spin.num_responses_to_gen == 4 and cfg.model.spin.num_evals_to_average == 3
    assert cfg.model.spin.meta_judge_pcnt == -1.0 and cfg.model.spin.meta_max_relative_pcnt == 0.4
    assert cfg.model.optim.lr == 9e-6 and cfg.model.optim.betas == [0.9, 0.98]
    assert cfg.model.optim.sched.warmup_steps == 10 and cfg.model.optim.sched.min_lr == 9e-7
    assert cfg.model.spin.sampling_params.end_strings == ["<|endoftext|>", "<extra_id_1>"]
    assert cfg.trainer.self_rewarding.max_iterations == 3 and cfg.seed == 1234


def test_round_trip_through_yaml(tmp_path):
    cfg = config.load(None, ["model.spin.length_control=[0,0,0.1]", "model.optim.lr=1e-4", "seed=7"], warn=None)
    p = tmp_path / "p.yaml"
    p.write_text(config.dump(cfg))
    again = config.load(p, warn=None)
    assert again == cfg and config.dump(again) == config.dump(cfg)
    assert config.params_hash(again) == config.params_hash(cfg)


def test_terminal_overrides_resolve():
    msgs = []
    cfg = config.load(None, TERMINAL, warn=msgs.append)
    assert cfg.pretrained_checkpoint.restore_from_path == "/path/to/megatron_gpt_sft.nemo"
    assert cfg.model.data.train_ds.file_path == "/data/train_sft_format.jsonl"
    assert cfg.model.data.validation_ds.file_path == "/data/valid.jsonl"
    assert cfg.exp_manager.explicit_log_dir == "/results"
    assert cfg.model.spin.length_params.max_length == 2048 and cfg.model.data.train_ds.max_seq_length == 4096
    assert cfg.model.spin.ref_policy_kl_penalty == 0.1 and cfg.model.spin.use_meta_judge is False
    assert cfg.model.global_batch_size == 64 and cfg.model.micro_batch_size == 1
    # launcher-only keys are reported in one line, never fatal; trainer.devices is honoured (torchrun processes)
    assert len(msgs) == 1
    for key in ("model.sequence_parallel", "exp_manager.wandb_logger_kwargs.project"):
        assert key in msgs[0]
    assert cfg.trainer.devices == 8 and "trainer.devices" not in msgs[0]


def test_slurm_overrides_resolve_quoted_path():
    cfg = config.load(None, SLURM, warn=None)
    assert cfg.pretrained_checkpoint.restore_from_path == "/ckpt/megatron_gpt_sft.nemo"
    assert cfg.trainer.self_rewarding.max_iterations == 3
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (4, 8)


@pytest.mark.parametrize("text,expected", [
    ("1e-6", 1e-6), ("9e-6", 9e-6), ("3", 3), ("-1", -1), ("0.5", 0.5), ("true", True), ("False", False),
    ("null", None), ("[0,0,0.1]", [0, 0, 0.1]), ("[]", []), ("'a b'", "a b"), ('"1"', "1"),
    ("[a, 'b,c']", ["a", "b,c"]), ("/x/y.jsonl", "/x/y.jsonl"),
])
def test_parse_value(text, expected):
    assert config.parse_value(text) == expected


def test_schedules_scalar_or_per_iteration():
    cfg = config.load(None, ["model.spin.length_control=[0,0,0.1]", "model.spin.ref_policy_kl_penalty=0.05"], warn=None)
    assert [config.schedule(cfg.model.spin.length_control, t) for t in range(3)] == [0.0, 0.0, 0.1]
    assert config.schedule(cfg.model.spin.ref_policy_kl_penalty, 2) == 0.05
    with pytest.raises(config.ConfigError, match="no value for it"):
        config.schedule([0.1, 0.2], 2)


def test_yaml_file_reads_exponent_without_dot_as_float(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model:\n  optim:\n    lr: 9e-6\n")
    assert config.load(p, warn=None).model.optim.lr == 9e-6


def test_plus_prefixes_and_delete():
    cfg = config.load(None, ["++model.spin.sft_loss_weight=0.5", "+model.spin.num_evals_to_average=5"], warn=None)
    assert cfg.model.spin.sft_loss_weight == 0.5 and cfg.model.spin.num_evals_to_average == 5


def test_hydra_prefixes_relative_to_the_file(tmp_path):
    """As `dvc exp run -S` applies them to params.yaml: + adds only what the file does not set, ~ deletes back to the
    schema's default (~key=value only when the value matches)."""
    p = tmp_path / "p.yaml"
    p.write_text("model:\n  optim:\n    lr: 1.0e-4\n")
    assert config.load(p, ["~model.optim.lr"], warn=None).model.optim.lr == 9e-6
    assert config.load(p, ["~model.optim.lr=1e-4"], warn=None).model.optim.lr == 9e-6
    assert config.load(p, ["~model.spin.cream"], warn=None).model.spin.cream == "none"  # not in the file: default
    assert config.load(p, ["++model.optim.lr=0.5"], warn=None).model.optim.lr == 0.5
    with pytest.raises(config.ConfigError, match=r"could not append, an item is already at model\.optim\.lr"):
        config.load(p, ["+model.optim.lr=0.5"], warn=None)
    with pytest.raises(config.ConfigError, match=r"the value of model\.optim\.lr is 0\.0001, not 0\.5"):
        config.load(p, ["~model.optim.lr=0.5"], warn=None)
    with pytest.raises(config.ConfigError, match="model.optim.lrr is not in the config; closest valid key: model.optim.lr"):
        config.load(p, ["~model.optim.lrr"], warn=None)


def test_hydra_values_quoting_dicts_and_interpolation(tmp_path):
    cfg = config.load(None, ["model.spin.judge_reward_regex='(?i)Score: {{ reward }}'", 'exp_manager.name="a,b"',
                             "model.spin.sampling_params={temperature:0.5,top_k:3}", "model.sft.lr=${model.optim.lr}",
                             r"model.spin.llm_judge_prompt='it\'s {{ prompt }} {{ response }}'"], warn=None)
    assert cfg.model.spin.judge_reward_regex == "(?i)Score: {{ reward }}" and cfg.exp_manager.name == "a,b"
    assert (cfg.model.spin.sampling_params.temperature, cfg.model.spin.sampling_params.top_k) == (0.5, 3)
    assert cfg.model.spin.sampling_params.top_p == 1.0  # a dict value merges into the section, as in Hydra
    assert cfg.model.sft.lr == 9e-6  # the interpolation resolves against the schema's default
    assert cfg.model.spin.llm_judge_prompt == "it's {{ prompt }} {{ response }}"
    p = tmp_path / "p.yaml"
    p.write_text("model:\n  optim:\n    lr: 1.0e-4\n  sft:\n    lr: ${model.optim.lr}\n")
    assert config.load(p, warn=None).model.sft.lr == 1e-4
    assert config.load(p, ["model.optim.lr=0.25"], warn=None).model.sft.lr == 0.25
    with pytest.raises(config.ConfigError, match="a sweep of values runs many configs"):
        config.load(None, ["seed=1,2"], warn=None)
    with pytest.raises(config.ConfigError, match=r"expected key=value.*\(.*'\('"):  # Hydra's reason, unquoted (
        config.load(None, ["model.spin.judge_reward_regex=(?i)x"], warn=None)
    with pytest.raises(config.ConfigError, match="model.sft.lr: .*model.optim.lrr"):
        config.load(None, ["model.sft.lr=${model.optim.lrr}"], warn=None)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30))
@settings(max_examples=200, deadline=None)
def test_quote_round_trips_through_hydra(text):
    assert config.parse_value(config.quote(text)) == text


BAD = [
    (["model.spin.use_meta_jugde=true"], "model.spin.use_meta_jugde.*closest valid key: model.spin.use_meta_judge"),
    (["++model.spin.lenght_control=0.1"], "model.spin.lenght_control.*closest valid key: model.spin.length_control"),
    (["model.spin.use_meta_judge=true"], r"model.spin.meta_judge_pcnt: must be in \[0, 1\]"),
    (["model.spin.use_meta_judge=true", "model.spin.meta_judge_pcnt=1.5"], r"meta_judge_pcnt: must be in \[0, 1\]"),
    (["model.spin.judge_score_low=5", "model.spin.judge_score_high=5"], "judge_score_low .* must be <"),
    (["model.micro_batch_size=3", "model.global_batch_size=64"], "global_batch_size: must be a multiple"),
    (["world.end_marks=words"], "world.end_marks: one of symbols, names, got 'words'"),
    (["world.kind_check=each"], "world.kind_check: one of whole, items, got 'each'"),
    (["world.kind_check=items", "model.spin.length_params.max_length=48"],
     "world.kind_check=items .*max_length must be >= 72, got 48"),
    (["model.spin.length_control=[0,0.1]"], "length_control: a per-iteration list needs one value per iteration"),
    (["model.spin.ref_policy_kl_penalty=[0.1,0.1]"], "ref_policy_kl_penalty: a per-iteration list"),
    (["model.spin.preference_loss=kto"], "preference_loss: one of dpo, scale, rpo_bwd_kl, rpo_fwd_kl, ipo, rpo_sq"),
    (["model.micro_batch_size=abc"], "model.micro_batch_size: expected an integer"),
    (["model.optim.betas=[0.9,abc]"], r"model.optim.betas\[1\]: expected a number, got 'abc'"),
    (["model.optim.betas=0.9"], "model.optim.betas: expected a list, got 0.9"),
    (["model.tiny=3"], "model.tiny: expected a mapping, got 3"),
    (["model.optim.sched.name=null"], "model.optim.sched.name: expected a string, got None"),
    (["model.spin.use_meta_judge=maybe"], "model.spin.use_meta_judge: expected true or false"),
    (["model.spin.sampling_params.top_p=0"], r"top_p: must be in \(0, 1\]"),
    (["model.spin.length_control=1.5"], r"length_control\[0\]: must be in \[0, 1\]"),
    (["model.optim.lr=-1"], "model.optim.lr: must be > 0"),
    (["trainer.self_rewarding.trt_llm.enable=true"], "TensorRT-LLM"),
    (["model.spin"], "expected key=value"),
    (["model.tensor_model_parallel_size=2"], "tensor_model_parallel_size=2: needs model.backend=mcore"),
    (["model.backend=mcore", "model.tensor_model_parallel_size=2", "trainer.devices=3"],
     r"must divide trainer.devices x trainer.num_nodes \(3\)"),
    (["model.pipeline_model_parallel_size=2"], "pipeline_model_parallel_size: must be 1"),
    (["trainer.accelerator=tpu"], "trainer.accelerator: one of auto, cpu, gpu"),
    (["trainer.devices=0"], "trainer.devices: must be >= 1"),
    (["trainer.precision=16"], "trainer.precision: one of 32, bf16, bf16-mixed.*fp16 needs a loss scaler"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_config_is_reported_with_key(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, overrides, warn=None)


@pytest.mark.parametrize("overrides,message", BAD[:4])
def test_cli_bad_config_exits_nonzero(overrides, message, capsys):
    assert main(["config", "show", "-c", "none", *overrides]) == 2
    assert "harness: error:" in capsys.readouterr().err


def test_cli_missing_and_malformed_config_file(tmp_path, capsys):
    assert main(["config", "show", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["config", "show", "-c", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  spin:\n    num_reponses_to_gen: 4\n")
    assert main(["config", "show", "-c", str(unknown)]) == 2
    assert "model.spin.num_reponses_to_gen" in capsys.readouterr().err


def test_console_script_config_show_prints_resolved_yaml():
    out = subprocess.run([sys.executable, "-m", "harness.cli", "config", "show", "-c", "none",
                          "model.spin.length_control=[0,0,0.1]"], capture_output=True, text=True, check=True)
    tree = yaml.safe_load(out.stdout)
    assert tree["model"]["spin"]["length_control"] == [0, 0, 0.1]


def test_params_yaml_and_experiments_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "params.yaml", *sorted((root / "experiments").glob("*.yaml"))]
    for f in files:
        if f.name == "sweep.yaml":
            continue
        if "\nconditions:" in f.read_text():  # table specs (table*.yaml, probe_*.yaml): conditions load on params.yaml
            from harness.table import load_spec

            load_spec(f)
            continue
        config.load(f, warn=None)
    assert len(files) >= 4


def test_readme_table_lists_every_key_with_meaning_and_default():
    from pathlib import Path

    from harness.config_keys import MEANING, markdown_table

    assert set(MEANING) == set(config.all_keys())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "README's key table is stale: regenerate it with `harness config keys`"


def test_overrides_may_follow_options(capsys):
    assert main(["config", "show", "seed=3", "-c", "none", "model.optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "lr: 0.5" in out
    with pytest.raises(SystemExit):
        main(["config", "show", "-c", "none", "--bogus"])


def test_log_dir_follows_exp_manager():
    from pathlib import Path

    from harness.layout import log_dir

    assert log_dir(config.Config()) == Path("runs")
    assert log_dir(config.load(None, ["exp_manager.exp_dir=/exp", "exp_manager.name=sr"], warn=None)) == Path("/exp/sr")
    both = ["exp_manager.exp_dir=/exp", "exp_manager.explicit_log_dir=/results"]
    assert log_dir(config.load(None, both, warn=None)) == Path("/results")  # NeMo: explicit_log_dir wins
