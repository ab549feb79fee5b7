"""dvc.yaml is generated from what each stage reads: in sync with params.yaml, and a param re-runs only its readers."""

import yaml

from harness import config, pipeline
from tests.conftest import ROOT


def test_committed_dvc_yaml_matches_params_yaml():
    cfg = config.load(ROOT / "params.yaml", warn=None)
    pipeline.check(cfg, ROOT / "dvc.yaml")


def test_params_yaml_lists_every_key_dvc_tracks():
    flat = config.flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for stage, keys in pipeline.STAGE_PARAMS.items():
        for key in keys:
            assert key in flat or any(k.startswith(key + ".") for k in flat), (stage, key)


def readers(key: str) -> set[str]:
    return {s for s, keys in pipeline.STAGE_PARAMS.items() if key in keys}


def test_length_control_reruns_pairs_not_generate_or_judge():
    assert readers("model.spin.length_control") == {"pairs"}  # train/evaluate follow through pairs.jsonl
    assert readers("model.spin.ref_policy_kl_penalty") == {"train"}
    assert readers("model.optim.lr") == {"train"}
    assert readers("model.spin.meta_judge_pcnt") == {"pairs"}


def test_iterations_follow_max_iterations():
    cfg = config.load(None, ["trainer.self_rewarding.max_iterations=5", "model.spin.first_iteration_sft=true"], warn=None)
    d = pipeline.dvc_yaml(cfg)
    items = d["stages"]["generate"]["foreach"]
    assert [(k, i["it"]) for k, i in items.items()] == [("1", 1), ("2", 2), ("3", 3), ("4", 4)]
    assert items["1"]["prev"] == "runs/iter0/model" and items["4"]["prev"] == "runs/iter3/model"
    assert "prev2" not in items["1"] and "${item.prev2}" not in d["stages"]["judge"]["do"]["deps"]
    # CREAM's previous judge M_{t-1}: the base model M0 for the first self-rewarding iteration
    cream = pipeline.dvc_yaml(config.load(None, ["trainer.self_rewarding.max_iterations=5", "model.spin.cream=avg"],
                                     warn=None))["stages"]
    items = cream["generate"]["foreach"]
    assert items["1"]["prev2"] == "runs/base/model" and items["4"]["prev2"] == "runs/iter2/model"
    assert "${item.prev2}" in cream["judge"]["do"]["deps"]
    cfg = config.load(None, ["trainer.self_rewarding.max_iterations=2", "pretrained_checkpoint.restore_from_path=/m"],
                 warn=None)
    d = pipeline.dvc_yaml(cfg)
    assert "sft" not in d["stages"]
    assert d["stages"]["generate"]["foreach"]["0"] == {"it": 0, "prev": "/m", "prompts": "runs/world"}


def test_every_user_data_file_is_a_dependency_of_the_stages_that_read_it():
    cfg = config.load(None, ["trainer.self_rewarding.max_iterations=3", "model.spin.first_iteration_sft=true",
                        "pretrained_checkpoint.restore_from_path=/m", "model.data.train_ds.file_path=[/p0,/p1,/p2]",
                        "model.data.validation_ds.file_path=/val", "model.data.judge_train_ds.file_path=/eft"],
                 warn=None)
    st = pipeline.dvc_yaml(cfg)["stages"]
    assert "prepare" not in st  # nothing to make: no world, no tiny model (it listed runs/world as an output)
    assert {"/m", "/p0", "/eft", "/val"} <= set(st["sft"]["deps"])  # IFT defaults to iteration 0's train_ds file
    items = st["generate"]["foreach"]
    assert [items[k]["prompts"] for k in ("1", "2")] == ["/p1", "/p2"]
    assert "${item.prompts}" in st["generate"]["do"]["deps"]
    assert "/val" in st["train"]["do"]["deps"] and "/val" in st["evaluate"]["do"]["deps"]
    assert not any("runs/world" in dep for s in st.values() for dep in s.get("deps", s.get("do", {}).get("deps", [])))


def test_user_checkpoint_on_the_task_world_and_exp_dir():
    cfg = config.load(None, ["pretrained_checkpoint.restore_from_path=/m", "exp_manager.exp_dir=/exp",
                        "exp_manager.name=trial"], warn=None)
    st = pipeline.dvc_yaml(cfg)["stages"]
    assert st["prepare"]["outs"] == ["/exp/trial/world"]  # the world, no tiny model
    assert st["generate"]["foreach"]["0"]["prompts"] == "/exp/trial/world"
    assert st["report"]["cmd"] == "harness report --root /exp/trial --out /exp/trial/report"


def test_stage_config_is_the_subset_the_stage_reads():
    cfg = config.load(None, ["model.spin.length_control=0.3"], warn=None)
    sub = pipeline.stage_config(cfg, "train")
    assert "length_control" not in sub["model"]["spin"] and sub["model"]["optim"]["lr"] == cfg.model.optim.lr
    assert pipeline.stage_config(cfg, "pairs")["model"]["spin"]["length_control"] == 0.3


def test_readme_module_map_matches_the_tree():
    """README's Architecture table names every module of harness/ (and its sub-packages) and nothing that is gone."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/.]+)` \|", section, re.M))
    tree = {p.name for p in (ROOT / "harness").glob("*.py") if p.name != "__init__.py"}
    tree |= {f"{p.name}/" for p in (ROOT / "harness").iterdir() if (p / "__init__.py").is_file()}
    assert listed == tree, f"missing: {sorted(tree - listed)}, gone: {sorted(listed - tree)}"
    for pkg in (p for p in (ROOT / "harness").iterdir() if (p / "__init__.py").is_file()):
        row = next(line for line in section.splitlines() if line.startswith(f"| `{pkg.name}/` |"))
        for mod in (m.name for m in pkg.glob("*.py") if m.name != "__init__.py"):
            assert mod in row, f"{pkg.name}/{mod} not in README's module map"


def test_dvc_parses_yaml_with_the_c_loader():
    """DVC reads dvc.yaml and dvc.lock (~3,000 lines on the default) with ruamel's safe loader at every command; the
    pure-Python parser took ~1.5 s more of a no-op `dvc repro`."""
    from ruamel.yaml import YAML

    assert YAML(typ="safe").Parser.__name__ == "CParser"
