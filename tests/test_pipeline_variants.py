"""Pipelines other than the embedded default, end to end under `dvc repro`: no SFT iteration (the schema default),
and experiments/hf_checkpoint.yaml on a Hugging Face checkpoint and jsonl prompt files made here."""

from __future__ import annotations

import json

import pytest

from harness.data.sft import make_record, write_sft
from tests.conftest import env, make_project, run

pytestmark = pytest.mark.slow
SMALL = ["world.num_ift=16", "world.num_eft=16", "world.num_mft=8", "world.prompts_per_iteration=4",
         "world.num_validation=4", "world.num_test=4", "model.spin.length_params.max_length=8",
         "trainer.self_rewarding.max_iterations=2"]


def test_no_sft_iteration_runs_end_to_end(tmp_path):
    """first_iteration_sft=false: iteration 0 is a self-rewarding iteration on the world's prompts_0."""
    proj = make_project(tmp_path / "p", overrides=[*SMALL, "model.spin.first_iteration_sft=false",
                                                   "model.spin.use_meta_judge=false", "model.spin.length_control=0"])
    out = run(["dvc", "repro"], proj).stdout
    assert "generate@0" in out and "'sft'" not in out
    assert (proj / "runs/world/prompts_0.jsonl").exists() and (proj / "runs/iter1/model/model.safetensors").exists()
    assert (proj / "runs/report/report.md").exists()


def _hf_checkpoint(path):
    """A tiny Llama saved as an ordinary HF directory, its tokenizer with a chat template (as instruct models ship)."""
    from harness.config import Tiny
    from harness.models.hf import build_tiny
    from harness.models.tokenizer import train_tokenizer

    texts = [f"Name a fruit number {i}. Apple {i}. Score: {i % 6}" for i in range(200)]
    tok = train_tokenizer(texts, 300)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    build_tiny(Tiny(hidden_size=32, num_layers=1, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=64), tok, seed=3).save(path, {})


def test_hf_checkpoint_experiment_runs_end_to_end_and_its_data_are_dependencies(tmp_path):
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    _hf_checkpoint(ckpt)
    write_sft(data / "prompts_it0.jsonl", [make_record(f"Name a fruit ({i})") for i in range(3)])
    write_sft(data / "valid.jsonl", [make_record(f"Name a fruit ({i})", f"Apple {i}") for i in range(3)])
    proj = make_project(tmp_path / "p", "experiments/hf_checkpoint.yaml", [
        f"pretrained_checkpoint.restore_from_path={ckpt}", f"model.data.train_ds.file_path=[{data / 'prompts_it0.jsonl'}]",
        f"model.data.validation_ds.file_path={data / 'valid.jsonl'}", "trainer.self_rewarding.max_iterations=1",
        "model.spin.length_params.max_length=6", "model.encoder_seq_length=1024", "tracking.enabled=false"])
    out = run(["dvc", "repro"], proj).stdout
    assert {"generate@0", "judge@0", "pairs@0", "train@0", "evaluate@0", "report"} <= {
        line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert "prepare" not in out  # a user checkpoint on user data: nothing to prepare
    ev = json.loads((proj / "runs/iter0/eval.json").read_text())
    assert "eval/val_loss" in ev and "eval/judge_self_parse_failure" in ev
    # the user's files are dependencies: editing the validation file re-runs train and evaluate, not generate
    write_sft(data / "valid.jsonl", [make_record(f"Name a fruit ({i})", f"Pear {i}") for i in range(3)])
    status = run(["dvc", "status"], proj, env=env()).stdout
    assert "train@0" in status and "evaluate@0" in status and "generate@0" not in status, status
    write_sft(data / "prompts_it0.jsonl", [make_record(f"Name a vegetable ({i})") for i in range(3)])
    assert "generate@0" in run(["dvc", "status"], proj, env=env()).stdout
