"""Bad input and faults, as a careless or hostile user makes them: each is a one-line error (exit 2) that names the
file, line or key the user wrote, and the stage that refuses it changes no output file (the run directory hashes the
same before and after). Stages run in-process on a project small enough to build in seconds (module fixture).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from harness import config, io
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


def snapshot(runs: Path) -> dict[str, tuple]:
    """Every file under runs (hidden ones too: a leftover temporary is a change) by content hash, inode and mtime: a
    stage that rewrites an output with the same bytes (it is deterministic) has still written it."""
    return {str(p.relative_to(runs)): (file_hash(p), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(runs.rglob("*")) if p.is_file()}


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
    ("sft_lr_overflow", ["sft"], None, ["model.sft.lr=1e300"], r"sft step 1 of \d+: step size inf: training diverged"),
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
    ("judged_no_meta", ["pairs", "-i", "1"],  # on the task world the oracle scores each response by its task's meta
     edit_jsonl("iter1/judged.jsonl", 2, lambda r: set_key(r, "meta", KeyError)), [],
     r"iter1/judged\.jsonl:2: meta: missing"),
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



def test_non_finite_weights_stop_training_before_anything_is_saved(good):
    """The last check of the loop: a weight that is not finite (here one the loss never reaches) is an error."""
    import torch

    from harness.models.base import load_policy
    from harness.train import Diverged, train_sft

    policy = load_policy(good / "runs/iter0/model")
    policy.model.register_parameter("unused", torch.nn.Parameter(torch.full((2,), float("inf"))))
    with pytest.raises(Diverged, match=r"sft step 1 of 1: weight unused inf: training diverged \(model\.sft\.lr="):
        train_sft(policy, [("Q: 1 2", "1 2")], config.load(good / "fast.yaml", warn=None))


# ----------------------------------------------------------------------------------------------------- not errors
def test_prompt_longer_than_the_context_is_cut_from_the_left_and_counted(good, proj):
    """NeMo keeps a too-long prompt's last tokens; the response equals that of the cut prompt, and it is counted."""
    from harness.generation.sampler import context_length, generate
    from harness.models.base import load_policy

    p = proj / "runs/world/prompts_1.jsonl"
    row = json.loads(p.read_text().splitlines()[0])
    row["conversations"][0]["value"] = "Sort these numbers: 3 1 2. " * 300
    p.write_text(p.read_text() + json.dumps({**row, "id": "long"}) + "\n")
    assert harness(proj, "generate", "-i", "1") == 0
    assert strict_json((proj / "runs/iter1/generate_metrics.json").read_text())["generate/truncated_prompts"] == 1

    policy = load_policy(good / "runs/iter0/model")
    cfg = config.load(good / "fast.yaml", warn=None)
    lp, sp = cfg.model.spin.length_params, cfg.model.spin.sampling_params
    ids = policy.tokenizer("x " * 2000, add_special_tokens=False)["input_ids"]
    room = context_length(policy.model) - lp.max_length
    cut = policy.tokenizer.decode(ids[-room:])
    assert policy.tokenizer(cut, add_special_tokens=False)["input_ids"] == ids[-room:]  # the cut text round-trips
    stats = {}
    out = generate(policy, ["x " * 2000, cut], num_samples=2, sampling_params=sp, length_params=lp,
                   seed_parts=[(1,), (1,)], stats=stats)
    assert stats == {"truncated_prompts": 1} and out[0] == out[1]


def test_metrics_files_are_strict_json_with_null_for_undefined(good):
    """No judgement of the tiny judge parses: the mean score and the pairwise accuracy are undefined (null), not NaN
    and not 0.0 (chance is 0.5)."""
    files = sorted((good / "runs").rglob("*.json"))
    assert len(files) >= 8
    for f in files:
        strict_json(f.read_text())
    judge = strict_json((good / "runs/iter1/judge_metrics.json").read_text())
    assert judge["judge/parse_failure_rate"] == 1.0 and judge["judge/mean_score"] is None
    ev = strict_json((good / "runs/iter1/eval.json").read_text())
    assert ev["eval/judge_parse_failure"] == 1.0 and ev["eval/judge_pairwise_acc"] is None
    for f in (good / "runs").rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            strict_json(line)


def test_judge_pairwise_accuracy_undefined_only_when_nothing_parses():
    from harness.evaluate import judge_agreement

    assert math.isnan(judge_agreement({"a": [(None, 1), (None, 3)]})["eval/judge_pairwise_acc"])
    assert judge_agreement({"a": [(None, 1), (4.0, 3)], "b": [(1.0, 0), (2.0, 5)]})["eval/judge_pairwise_acc"] == 0.5


def test_eval_metrics_lists_what_evaluate_writes(good):
    from harness.evaluate import eval_metrics

    cfg = config.load(good / "fast.yaml", warn=None)
    for t in (0, 1):
        written = {k for k in strict_json((good / f"runs/iter{t}/eval.json").read_text()) if k.startswith("eval/")}
        assert written == eval_metrics(cfg, t)


def test_no_usable_pair_is_a_loud_warning(proj, capsys):
    """stderr, an MLflow tag on the iteration's run and the pipeline's, and the report; M2 = M1 and exit 0."""
    from mlflow import MlflowClient

    edit_all_unparsed(proj)
    uri = f"sqlite:///{proj / 'mlflow.db'}"
    track = ["tracking.enabled=true", f"tracking.tracking_uri={uri}"]
    assert harness(proj, "pairs", "-i", "1", *track) == 0
    assert "harness: WARNING: iteration 1: no usable preference pair" in capsys.readouterr().err
    assert harness(proj, "train", "-i", "1", *track) == 0
    assert "M2 is M1" in capsys.readouterr().err
    assert file_hash(proj / "runs/iter1/model/model.safetensors") == file_hash(
        proj / "runs/iter0/model/model.safetensors")
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("self-rewarding").experiment_id])
    tags = {k: v for r in runs for k, v in r.data.tags.items() if k.startswith("harness.warning")}
    assert set(tags) == {"harness.warning", "harness.warning.iter1"}
    assert all("no usable preference pair" in v for v in tags.values())
    assert harness(proj, "report", "--out", str(proj / "runs/report")) == 0
    assert "**Warning**: iteration 1: no usable preference pair" in (proj / "runs/report/report.md").read_text()


# ----------------------------------------------------------------------------------------------------- io
def test_stage_outputs_commit_together_or_not_at_all(tmp_path):
    out = tmp_path / "iter1"
    io.write_json(out / "a.json", {"v": 1})
    io.write_json(out / "b.json", {"v": 1})
    with pytest.raises(RuntimeError), io.stage_outputs(out):
        io.write_json(out / "a.json", {"v": 2})
        assert io.read_json(out / "a.json") == {"v": 1}  # not visible before the commit...
        assert io.read_json(io.pending(out / "a.json")) == {"v": 2}  # ...except where the stage asks for it
        raise RuntimeError("the stage fails after writing a")
    assert io.read_json(out / "a.json") == {"v": 1} and sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]
    with io.stage_outputs(out):
        io.write_json(out / "a.json", {"v": 2})
        io.write_json(out / "b.json", {"v": 2})
        io.write_json(tmp_path / "elsewhere.json", {"v": 2})  # not under the stage's roots: written at once
        assert (tmp_path / "elsewhere.json").exists()
    assert [io.read_json(out / n) for n in ("a.json", "b.json")] == [{"v": 2}, {"v": 2}]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]


def test_files_in_the_working_directory_read_and_write(tmp_path, monkeypatch):
    """A bare file name has the parent "." (no name): the crash-recovery check must not fail on it."""
    monkeypatch.chdir(tmp_path)
    io.write_jsonl("rows.jsonl", [{"a": 1}])
    io.write_json("m.json", {"b": 2})
    assert io.read_jsonl("rows.jsonl") == [{"a": 1}] and io.read_json("m.json") == {"b": 2}


def test_nan_is_written_as_null(tmp_path):
    io.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 0.5})
    assert strict_json((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None], "c": 0.5}
    io.write_jsonl(tmp_path / "r.jsonl", [{"x": float("-inf")}, {"x": 2}])
    assert [strict_json(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [{"x": None}, {"x": 2}]


# ----------------------------------------------------------------------------------------------------- sweep
SWEEP_PARAMS = "params:\n  model.optim.lr: {type: float, low: 1.0e-5, high: 1.0e-4, log: true}\n"
SWEEP_CASES = [
    ("n_trials: abc\n", r"n_trials: expected an integer, got 'abc'"),
    ("timeout: soon\n", r"timeout: expected a number, got 'soon'"),
    ("timeout: -5\n", r"timeout: seconds, must be > 0"),
    ("sampler: tpe\n", r"sampler: expected a mapping, got 'tpe'"),
    ("sampler: {name: tpe, n_startup_trials: '4'}\n", r"sampler\.n_startup_trials: expected int, got '4'"),
    ("sampler: {name: tpe, n_startup: 4}\n", r"sampler\.n_startup: not an argument of TPESampler"),
    ("sampler: {name: random, seed: 3}\n", r"sampler\.seed: .*the space file's `seed`"),
    ("pruner: {name: median, n_warmup_steps: -1}\n", r"pruner: MedianPruner refuses .*negative"),
    ("pruner: {name: threshold}\n", r"pruner: ThresholdPruner refuses .*lower or upper"),
    ("objective: maximize\n", r"objective: expected a mapping, got 'maximize'"),
    ("objective: {metric: eval/win_rate_vs_m}\n",
     r"objective\.metric: 'eval/win_rate_vs_m' is not written .*closest valid key: eval/win_rate_vs_m1"),
    ("objective: {iteration: 9}\n", r"objective\.iteration: 9 is not a self-rewarding iteration .*\(they are 1, 2\)"),
    ("overrides: model.spin.use_meta_judge=true\n", r"overrides: expected a list, got 'model\.spin"),
    ("overrides: [3]\n", r"overrides\[0\]: expected a string"),
    # the second param's first value is refused: the message must blame it, not the param checked first
    (SWEEP_PARAMS + "  model.spin.length_control: {type: float, low: -1.0, high: 0.5}\n",
     r"params\.model\.spin\.length_control: model\.spin\.length_control=-1\.0 is refused .*length_control"),
    ("overrides: [model.spin.use_meta_judge=false]\n"
     "params:\n  model.spin.meta_judge_pcnt: {type: float, low: 0.0, high: 1.5}\n",
     r"params\.model\.spin\.meta_judge_pcnt: value 1\.5 is refused"),  # refused even with use_meta_judge=false
]


@pytest.mark.parametrize("text, message", SWEEP_CASES)
def test_bad_sweep_space_fails_before_any_trial(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)  # not a git repository: a space file wrongly accepted cannot start a trial
    space = tmp_path / "space.yaml"
    space.write_text(text + ("" if "params:" in text else SWEEP_PARAMS))
    db = tmp_path / "never.db"
    base = Path(__file__).resolve().parents[1] / "experiments/smoke.yaml"
    assert main(["sweep", str(space), "-c", str(base), "--storage", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"harness: error: {space}: "), err
    assert re.search(message, err[0]), err[0]
    assert not db.exists()  # no study, no trial
