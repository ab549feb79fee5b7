"""The multi-seed table: spec checks, mean +- sd over seeds (hand-worked), README markers, plot.

Hand-worked: condition SR, seeds 1 and 2, M2 win rates 0.6 and 0.7: mean 0.65, sd = sqrt(((0.05)^2 * 2) / 1) =
0.0707. M1 has no pairs: its pairs metrics stay "-".
"""

import pytest

from harness import table
from harness.io import read_json


def _base(tmp_path, **extra):
    p = tmp_path / "params.yaml"
    p.write_text("trainer: {self_rewarding: {max_iterations: 2}}\nmodel: {spin: {first_iteration_sft: true}}\n"
                 "tracking: {enabled: false}\n")
    spec = tmp_path / "table.yaml"
    body = {"name": "t", "seeds": [1, 2], "base": str(p),
            "conditions": {"SR": [], "Oracle labels": ["model.spin.pair_labels=oracle"]}, **extra}
    import yaml

    spec.write_text(yaml.safe_dump(body, sort_keys=False))
    return spec


def _exps():
    out = {}
    for cond, wr in (("sr", (0.6, 0.7)), ("oracle-labels", (0.8, 0.8))):
        for seed, w in zip((1, 2), wr):
            out[f"t-{cond}-s{seed}"] = {
                "runs/iter0/eval.json": {"eval/win_rate_vs_m1": 0.5, "eval/oracle_reward": 2.0},
                "runs/iter1/eval.json": {"eval/win_rate_vs_m1": w, "eval/oracle_reward": 2.0 + seed},
                "runs/iter1/pairs_metrics.json": {"pairs/oracle_correct_frac": 0.5 * seed},
            }
    return out


def test_collect_mean_sd_table_plot_and_readme(tmp_path):
    spec = table.load_spec(_base(tmp_path))
    assert spec.exp_name("Oracle labels", 2) == "t-oracle-labels-s2"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold numbers\n{table.END}\noutro\n")
    md = table.collect(spec, tmp_path / "out", readme, exps=_exps())
    line = next(ln for ln in md.splitlines() if ln.startswith("| SR | M2 |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[:3] == ["SR", "M2", "2"]
    assert cells[3 + spec.metrics.index("eval/oracle_reward")] == "3.500 ± 0.707"
    assert cells[3 + spec.metrics.index("eval/win_rate_vs_m1")] == "0.650 ± 0.071"
    assert cells[3 + spec.metrics.index("pairs/oracle_correct_frac")] == "0.750 ± 0.354"
    m1 = next(ln for ln in md.splitlines() if ln.startswith("| SR | M1 |"))
    assert "-" in m1.split("|")[3 + 1 + spec.metrics.index("pairs/oracle_correct_frac")]
    assert "- Oracle labels: 0.800, 0.800" in md
    text = readme.read_text()
    assert "old numbers" not in text and md in text and text.startswith("intro\n") and text.endswith("outro\n")
    res = read_json(tmp_path / "out" / "results.json")
    assert res["summary"][1]["eval/win_rate_vs_m1"]["mean"] == pytest.approx(0.65)
    assert (tmp_path / "out" / "table.png").stat().st_size > 0
    ticks = table.plot(spec, table.summarize(spec, table.per_seed_rows(spec, _exps())), tmp_path / "p.png")
    assert ticks == {m: ["M1", "M2"] for m in ("eval/win_rate_vs_m1", "eval/oracle_reward",
                                                "eval/judge_own_pairwise_acc", "pairs/oracle_correct_frac")}
    assert (tmp_path / "out" / "per_seed.csv").read_text().count("\n") == 1 + 2 * 2 * 2


def test_one_seed_shows_no_spread(tmp_path):
    """With one seed the sd is undefined: the cell is the value alone, never a made-up ± 0.000."""
    spec = table.load_spec(_base(tmp_path))
    spec.seeds = [1]
    md = table.collect(spec, tmp_path / "out", None, exps={k: v for k, v in _exps().items() if k.endswith("-s1")})
    line = next(ln for ln in md.splitlines() if ln.startswith("| SR | M2 |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "1" and cells[3 + spec.metrics.index("eval/win_rate_vs_m1")] == "0.600" and "±" not in line
    assert read_json(tmp_path / "out" / "results.json")["summary"][1]["eval/win_rate_vs_m1"]["sd"] is None


def test_missing_experiment_and_bad_specs(tmp_path):
    spec = table.load_spec(_base(tmp_path))
    exps = _exps()
    del exps["t-sr-s2"]
    with pytest.raises(table.TableError, match="t-sr-s2 not found"):
        table.collect(spec, tmp_path / "out", exps=exps)
    with pytest.raises(table.TableError, match="conditions.Bad: unknown config key model.spin.pair_label"):
        table.load_spec(_base(tmp_path, conditions={"Bad": ["model.spin.pair_label=oracle"]}))
    with pytest.raises(table.TableError, match="seeds must be"):
        table.load_spec(_base(tmp_path, seeds=[]))
    with pytest.raises(table.TableError, match="must differ"):
        table.load_spec(_base(tmp_path, conditions={"A b": [], "a-B": []}))
    with pytest.raises(table.TableError, match="targets must be a list of DVC stage names"):
        table.load_spec(_base(tmp_path, targets="evaluate@1"))
    assert table.load_spec(_base(tmp_path, targets=["evaluate@1", "pairs@1"])).targets == ["evaluate@1", "pairs@1"]


def test_paired_by_seed_against_the_reference(tmp_path):
    """Hand-worked: SR's M2 win rates 0.6, 0.7 against Oracle labels' 0.8, 0.8 on the same seeds: differences -0.2,
    -0.1, mean -0.15, sd sqrt((0.05^2 * 2) / 1) = 0.0707, no seed above 0. Oracle scores 3, 4 on both sides: 0 and 0.
    Only eval/ metrics are compared (the reference's pairs are labelled otherwise); one without values shows "-"."""
    spec = table.load_spec(_base(tmp_path, reference="Oracle labels"))
    md = table.collect(spec, tmp_path / "out", None, exps=_exps())
    assert "Last model (M2) minus Oracle labels, paired by seed" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| SR | ") and "(0/2)" in ln)
    header = next(ln for ln in md.splitlines() if ln.startswith("| condition | ") and "model" not in ln)
    cells = dict(zip([c.strip() for c in header.split("|")[2:-1]], [c.strip() for c in row.split("|")[2:-1]]))
    assert cells == {"oracle_reward": "+0.000 ± 0.000 (0/2)", "win_rate_vs_m1": "-0.150 ± 0.071 (0/2)",
                     "judge_own_pairwise_acc": "-", "judge_pairwise_acc": "-"}  # no values: no difference
    assert not any(ln.startswith("| Oracle labels | ") and "/2)" in ln for ln in md.splitlines())
    res = read_json(tmp_path / "out" / "results.json")["paired"]
    wr = next(p for p in res if p["metric"] == "eval/win_rate_vs_m1")
    assert wr["condition"] == "SR" and wr["per_seed"] == pytest.approx([-0.2, -0.1])
    assert wr["mean"] == pytest.approx(-0.15) and wr["sd"] == pytest.approx(0.0707107, abs=1e-6)
    assert {p["metric"] for p in res} == {m for m in spec.metrics if m.startswith("eval/")}
    assert next(p for p in res if p["metric"] == "eval/judge_pairwise_acc")["n"] == 0
    assert "paired by seed" not in table.collect(table.load_spec(_base(tmp_path)), tmp_path / "o2", None, exps=_exps())
    with pytest.raises(table.TableError, match="reference must name one of the conditions"):
        table.load_spec(_base(tmp_path, reference="Random labels"))


STATUS = """Task     Name                       Created    Status
b500d27  table-oracle-labels-s1234  10:35 AM   Running
3a38cc9  table-cream-s1             11:29 AM   Running
2b6906c  table-oracle-labels-s1     12:26 PM   Queued
c244132  table-sr-s1234             12:26 PM   Success

Worker status: {} active, 0 idle
"""


@pytest.mark.parametrize("active,killed", [(0, ["b500d27", "3a38cc9"]), (1, [])])
def test_tasks_a_killed_run_left_running_are_marked_failed(monkeypatch, active, killed):
    """`dvc exp run --run-all` follows every Running task: one left by a killed run (no worker) would hang it."""
    calls = []

    def dvc(args, env=None, capture=True):
        calls.append(args)
        return STATUS.format(active) if args == ["queue", "status"] else ""

    monkeypatch.setattr(table, "_dvc", dvc)
    assert table.kill_stale_tasks() == killed
    assert calls[1:] == ([["queue", "kill", *killed]] if killed else [])


def test_per_seed_csv_quotes_a_condition_with_a_comma(tmp_path):
    import csv

    spec = table.load_spec(_base(tmp_path))
    spec.conditions = {"SR, plain": spec.conditions["SR"], "Oracle labels": spec.conditions["Oracle labels"]}
    exps = {k.replace("t-sr-", "t-sr-plain-"): v for k, v in _exps().items()}
    assert spec.exp_name("SR, plain", 1) in exps
    table.collect(spec, tmp_path / "out", None, exps=exps)
    with open(tmp_path / "out" / "per_seed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["condition"] for r in rows} == {"SR, plain", "Oracle labels"}
    assert {r["eval/win_rate_vs_m1"] for r in rows if r["condition"] == "SR, plain" and r["model"] == "M2"} == {
        "0.6", "0.7"}
