"""Bad input and faults, as a careless or hostile user makes them: each is a one-line error (exit 2) that names the
file, line or key the user wrote, and the stage that refuses it changes no output file (the run directory hashes the
same before and after). Stages run in-process on a project small enough to build in seconds (module fixture).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from harness import io
from harness.cli import main
from harness.io import file_hash

FAST = """\
seed: 1234
trainer:
  self_rewarding: {max_iterations: 2, max_epochs: 1, val_check_interval: 1.0, save_interval: 2}
model:
  micro_batch_size: 2
  global_batch_size: 4
  tiny: {hidden_size: 32, num_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, intermediate_size: 64,
         vocab_size: 300}
  sft: {max_epochs: 1, lr: 2.0e-3}
  optim: {name: adamw, lr: 1.0e-4, weight_decay: 0.0, sched: {warmup_steps: 1, constant_steps: 0, min_lr: 1.0e-5}}
  spin:
    first_iteration_sft: true
    judge_template: compact
    num_responses_to_gen: 2
    num_evals_to_average: 2
    use_meta_judge: true
    meta_judge_pcnt: 0.25
    length_params: {max_length: 6}
    sampling_params: {end_strings: ["<extra_id_1>"]}
  data:
    train_ds: {max_seq_length: 192}
    validation_ds: {max_seq_length: 192}
    sft_ds: {max_seq_length: 192}
world: {num_ift: 4, num_eft: 4, num_mft: 2, prompts_per_iteration: 4, num_validation: 2, num_test: 2}
tracking: {enabled: false}
"""


def harness(d: Path, *argv: str) -> int:
    return main([*argv, "-c", str(d / "fast.yaml"), "--root", str(d / "runs")])


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq, Go) do."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in a metrics file"))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A complete iteration 1 (SFT, SFT baseline, generate ... evaluate), every stage run once through the CLI."""
    d = tmp_path_factory.mktemp("faults")
    (d / "fast.yaml").write_text(FAST)
    for argv in (["prepare"], ["sft"], ["sft_baseline"], ["generate", "-i", "1"], ["judge", "-i", "1"],
                 ["meta_judge", "-i", "1"]):
        assert harness(d, *argv) == 0, argv
    # The tiny model's own judgements do not parse; score the responses by hand so iteration 1 has real pairs.
    judged = d / "runs/iter1/judged.jsonl"
    rows = io.read_jsonl(judged)
    for row in rows:
        for j, r in enumerate(row["responses"]):
            r.update(text=f"answer {j} to {row['id']}", is_end=True, mean=float(j + 1), var=0.0,
                     judgements=[{"text": f"Score: {j + 1}", "score": float(j + 1)}])
    io.write_jsonl(judged, rows)
    for argv in (["pairs", "-i", "1"], ["train", "-i", "1"], ["evaluate", "-i", "0"], ["evaluate", "-i", "1"]):
        assert harness(d, *argv) == 0, argv
    return d


def snapshot(runs: Path) -> dict[str, str]:
    """Every file under runs (hidden ones too: a leftover temporary is a change), by content hash."""
    return {str(p.relative_to(runs)): file_hash(p) for p in sorted(runs.rglob("*")) if p.is_file()}


@pytest.fixture
def proj(good, tmp_path) -> Path:
    shutil.copytree(good / "runs", tmp_path / "runs")
    shutil.copy(good / "fast.yaml", tmp_path / "fast.yaml")
    return tmp_path


# ----------------------------------------------------------------------------------------------------- mutations
def edit_jsonl(rel: str, line: int, fn):
    """Replace row `line` (1-based) of runs/<rel> by fn(row)."""
    def mutate(d: Path) -> None:
        p = d / "runs" / rel
        lines = p.read_text().splitlines()
        lines[line - 1] = json.dumps(fn(json.loads(lines[line - 1])))
        p.write_text("\n".join(lines) + "\n")
    return mutate


def write(rel: str, data: bytes):
    def mutate(d: Path) -> None:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return mutate


def delete(rel: str):
    return lambda d: (d / "runs" / rel).unlink()


def nan_weights(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "runs/iter0/model/model.safetensors"
    tensors = load_file(str(f))
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})


def set_key(row: dict, path: str, value) -> dict:
    node = row
    *parts, last = path.split(".")
    for p in parts:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return row


def shorten_baseline(d: Path) -> None:
    p = d / "runs/sft_baseline/eval_answers.jsonl"
    p.write_text(p.read_text().splitlines()[0] + "\n")


def edit_all_unparsed(d: Path) -> None:
    p = d / "runs/iter1/judged.jsonl"
    rows = io.read_jsonl(p)
    for row in rows:
        for r in row["responses"]:
            r.update(mean=None, var=None, judgements=[{"text": "no verdict", "score": None}])
    io.write_jsonl(p, rows)


# (id, argv, mutation, overrides, what the message must say: a regex naming the file:line:key or the key)
CASES = [
    # silent damage
    ("sft_lr_inf", ["sft"], None, ["model.sft.lr=inf"], r"model\.sft\.lr: expected a finite number, got inf"),
    ("sft_lr_nan", ["sft"], None, ["model.sft.lr=nan"], r"model\.sft\.lr: expected a finite number, got nan"),
    ("list_inf", ["sft"], None, ["model.spin.length_control=[0,inf]"],
     r"model\.spin\.length_control\[1\]: expected a finite number"),
    ("sft_diverges", ["sft"], None, ["model.sft.lr=1e30"],
     r"sft step \d+ of \d+: .*nan.*training diverged \(model\.sft\.lr=1e\+30\); no model was written"),
    ("empty_prompts", ["generate", "-i", "1"], write("runs/world/prompts_1.jsonl", b""), [],
     r"runs/world/prompts_1\.jsonl: no rows"),
    ("blank_prompts", ["generate", "-i", "1"], write("runs/world/prompts_1.jsonl", b"\n  \n\n"), [],
     r"runs/world/prompts_1\.jsonl: no rows"),
    ("empty_responses", ["judge", "-i", "1"], write("runs/iter1/responses.jsonl", b"\n"), [],
     r"iter1/responses\.jsonl: no rows"),
    ("empty_judged", ["pairs", "-i", "1"], write("runs/iter1/judged.jsonl", b""), [], r"iter1/judged\.jsonl: no rows"),
    ("empty_sft_data", ["sft"], write("empty.jsonl", b"\n"),
     ["model.data.sft_ds.file_path=EMPTY", "model.data.judge_train_ds.file_path=EMPTY"],
     r"empty\.jsonl.*: no SFT example"),
    ("train_before_pairs_metrics", ["train", "-i", "1"], delete("iter1/pairs_metrics.json"), [],
     r"iter1/pairs_metrics\.json: file not found"),
    ("evaluate_without_baseline", ["evaluate", "-i", "1"], delete("sft_baseline/eval_answers.jsonl"), [],
     r"sft_baseline/eval_answers\.jsonl: file not found"),
    ("baseline_other_split", ["evaluate", "-i", "1"], shorten_baseline, [], r"2 test answers against 1 baseline"),
    ("require_pairs", ["pairs", "-i", "1"], lambda d: edit_all_unparsed(d), ["model.spin.require_pairs=true"],
     r"iteration 1: no usable preference pair .*model\.spin\.require_pairs=true"),
    # tracebacks before
    ("utf8_prompts", ["generate", "-i", "1"],
     lambda d: (d / "runs/world/prompts_1.jsonl").write_bytes(
         (d / "runs/world/prompts_1.jsonl").read_bytes().replace(b"\n", b"\n\xff", 1)), [],
     r"runs/world/prompts_1\.jsonl:2: not valid UTF-8"),
    ("utf8_config", ["sft"], write("fast.yaml", b"seed: 1234\n# caf\xe9\n" + FAST.encode().split(b"\n", 1)[1]), [],
     r"fast\.yaml:2: not valid UTF-8"),
    ("responses_oops", ["judge", "-i", "1"], edit_jsonl("iter1/responses.jsonl", 1, lambda r: {**r, "responses": "oops"}),
     [], r"iter1/responses\.jsonl:1: responses: expected a list, got str"),
    ("responses_no_is_end", ["judge", "-i", "1"],
     edit_jsonl("iter1/responses.jsonl", 2, lambda r: set_key(r, "responses.1.is_end", KeyError)), [],
     r"iter1/responses\.jsonl:2: responses\[1\]\.is_end: missing"),
    ("judged_bad_mean", ["pairs", "-i", "1"],
     edit_jsonl("iter1/judged.jsonl", 3, lambda r: set_key(r, "responses.0.mean", "high")), [],
     r"iter1/judged\.jsonl:3: responses\[0\]\.mean: expected float or null, got str"),
    ("judged_bad_is_end", ["meta_judge", "-i", "1"],
     edit_jsonl("iter1/judged.jsonl", 1, lambda r: set_key(r, "responses.0.is_end", 1)), [],
     r"iter1/judged\.jsonl:1: responses\[0\]\.is_end: expected bool, got int"),
    ("pairs_bad_score", ["train", "-i", "1"],
     edit_jsonl("iter1/pairs.jsonl", 1, lambda r: {**r, "chosen_score": "5"}), [],
     r"iter1/pairs\.jsonl:1: chosen_score: expected float, got str"),
    ("pairs_not_object", ["train", "-i", "1"], edit_jsonl("iter1/pairs.jsonl", 1, lambda r: [r]), [],
     r"iter1/pairs\.jsonl:1: row: expected an object, got list"),
    ("nan_checkpoint", ["generate", "-i", "1"], nan_weights, [],
     r"runs/iter0/model: non-finite weights \(NaN or inf\) in model\.norm\.weight"),
    ("max_length_beyond_context", ["generate", "-i", "1"], None, ["model.spin.length_params.max_length=5000"],
     r"model\.spin\.length_params\.max_length=5000 leaves no room for a prompt in the model's context of 1024"),
    ("seed_negative", ["generate", "-i", "1"], None, ["seed=-1"], r"seed: must be in \[0, 2\^63\), got -1"),
    ("seed_int64", ["generate", "-i", "1"], None, ["seed=123456789012345678901"], r"seed: .* 64-bit integer range"),
    ("save_interval_0", ["train", "-i", "1"], None, ["trainer.self_rewarding.save_interval=0"],
     r"trainer\.self_rewarding\.save_interval: must be >= 1"),
    ("vocab_too_small", ["prepare"], None, ["model.tiny.vocab_size=100"], r"model\.tiny\.vocab_size: must be >= 262"),
    ("judge_template_syntax", ["judge", "-i", "1"], None, ["model.spin.llm_judge_prompt='Rate {{ response '"],
     r"model\.spin\.llm_judge_prompt: not a valid Jinja2 template \(line 1\)"),
    ("meta_template_variable", ["judge", "-i", "1"], None, ["model.spin.llm_meta_judge_prompt='{{ judgment_a }}'"],
     r"model\.spin\.llm_meta_judge_prompt: unknown variable\(s\) judgment_a"),
    ("judge_regex", ["judge", "-i", "1"], None, ["model.spin.judge_reward_regex='Score: ({{ reward }}'"],
     r"model\.spin\.judge_reward_regex: .*not a valid regular expression"),
    ("meta_regex", ["meta_judge", "-i", "1"], None, ["model.spin.meta_judge_reward_regex='Winner: ({{ reward }}'"],
     r"model\.spin\.meta_judge_reward_regex: .*not a valid regular expression"),
    ("meta_pcnt_unused", ["pairs", "-i", "1"], None, ["model.spin.use_meta_judge=false", "model.spin.meta_judge_pcnt=1.5"],
     r"model\.spin\.meta_judge_pcnt: must be in \[0, 1\] \(or -1, unset\), got 1\.5"),
    # misleading messages before
    ("empty_path", ["generate", "-i", "1"], None, ["model.data.train_ds.file_path=''"],
     r"model\.data\.train_ds\.file_path: empty path"),
    ("deleted_lr", ["train", "-i", "1"], None, ["~model.optim.lr"],
     r"model\.optim\.lr is at its default 9e-06 \(deleted by '~model\.optim\.lr'\)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_changes_nothing(case, proj, capsys):
    name, argv, mutate, overrides, message = case
    if mutate is not None:
        mutate(proj)
    overrides = [o.replace("EMPTY", str(proj / "empty.jsonl")) for o in overrides]
    before = snapshot(proj / "runs")
    capsys.readouterr()
    assert harness(proj, *argv, *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("harness: error: ") and "Traceback" not in "\n".join(err), err
    assert re.search(message, err[-1]), err[-1]
    assert snapshot(proj / "runs") == before  # nothing written, nothing half-written, no temporary left

