"""The synthetic task world: hand-graded oracle examples at every level, degrade, determinism, disjoint splits.

Rubric (additive, one point each): relevant, substantial (>= half right), basic elements, complete, impeccable.
"""

import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import World
from harness.data import sft, world
from harness.io import read_jsonl, tree_hash
from harness.judging import parse

META = {
    "animals": {"family": "animals", "k": 2, "case": "lowercase", "open": ">", "sep": "commas", "end": ".",
                "offset": 3},  # gold "> bee, cat."
    "foods": {"family": "foods", "k": 3, "case": "capitals", "open": "*", "sep": "dashes", "end": "!",
              "offset": 0},  # gold "* BUN - EGG - FIG!"
    "tools": {"family": "tools", "k": 2, "case": "capitalized", "open": "+", "sep": "slashes", "end": "?",
              "offset": 10},  # gold "+ Cup / Mug?"
    "body": {"family": "body", "k": 4, "case": "lowercase", "open": "#", "sep": "bars", "end": ":",
             "offset": 8},  # gold "# toe | gum | arm | ear:"
}

# One point per check: kind (every item a word of the asked kind), count (exactly k), case, open (the asked symbol
# and a space first), format (separator, end mark, nothing else). No word of the kind at all: 0.
HAND_GRADED = {
    "animals": [
        ("> bee, cat.", 5), ("> fox, owl.", 5), (" > cat, bee.\n", 5),
        ("> cat, owl", 4), ("> cat - owl.", 4), ("cat, owl.", 4), ("* cat, owl.", 4), ("> cat, egg.", 4),
        ("> cat, owl, pig.", 4), ("> cat.", 4), ("> cat, OWL.", 4), ("> cats, owl.", 4),
        ("cat, owl", 3), (">cat, owl.", 3), ("cat - egg", 2), ("Sure! cat, owl.", 0), ("CAT, OWL, PIG", 1),
        ("* dog, fox, egg.", 2),
        ("I do not know.", 0), ("", 0), ("cats dogs", 0), ("catowl.", 0), ("> egg, pen.", 0),
    ],
    "foods": [
        ("* BUN - EGG - FIG!", 5), ("* JAM - PIE - TEA!", 5),
        ("* bun - egg - fig!", 4), ("* BUN - EGG - FIG", 4), ("> BUN - EGG - FIG!", 4), ("* BUN - EGG!", 4),
        ("* BUN - EGG - COW!", 4), ("* Bun - EGG - FIG!", 4),
        ("bun, egg, fig", 2), ("* BUN", 3), ("Jam bun", 1), ("bun, egg, COW", 1), ("* COW - PIG!", 0),
    ],
    "tools": [
        ("+ Cup / Mug?", 5), ("+ Axe / Saw?", 5),
        ("Cup / Mug?", 4), ("+ Cup, Mug?", 4), ("+ Cup / Mug / Pen?", 4), ("+ Cup / Mug.", 4), ("+ cup / Mug?", 4),
        ("+ Cup?", 4), ("cup", 1), ("saw cow", 1), ("cow", 0), ("Cup, Mug?", 3), ("Cup, Cow", 2), ("Hello", 0),
    ],
    "body": [
        ("# toe | gum | arm | ear:", 5), ("# arm | leg | lip | rib:", 5),
        ("# toe | gum | arm:", 4), ("toe | gum | arm | ear:", 4), ("# toe, gum, arm, ear:", 4),
        ("# TOE | GUM | ARM | EAR:", 4), ("# toe | gum | arm | cat:", 4),
        ("toe gum arm ear", 3), ("TOE GUM", 1), ("toe, gum", 2), ("EAR", 1), ("tea", 0),
    ],
}


@pytest.mark.parametrize("family,response,expected",
                         [(f, r, s) for f, cases in HAND_GRADED.items() for r, s in cases])
def test_hand_graded_examples(family, response, expected):
    g = world.grade(META[family], response)
    assert g.score == expected
    assert 0 < len(g.reason.split()) <= 30
    if g.checks:  # the reason walks each check and ends on the total: the judge's score is its last number
        assert g.reason.split()[-1] == str(expected) and len(g.checks) == 5 and sum(g.checks) == expected


def test_hand_graded_cover_every_family_and_level():
    assert set(HAND_GRADED) == set(world.FAMILIES)
    for family, cases in HAND_GRADED.items():
        assert {s for _, s in cases} >= {0, 1, 2, 4, 5}, family
        assert world.oracle_score(META[family], world.gold_answer(META[family])) == 5


def test_gold_answers_and_prompts():
    assert [world.gold_answer(META[f]) for f in world.FAMILIES] == ["> bee, cat.", "* BUN - EGG - FIG!", "+ Cup / Mug?",
                                                            "# toe | gum | arm | ear:"]
    assert world.make_task("body", random.Random(1), "t").prompt.startswith("Name ")
    assert " body parts " in world.make_task("body", random.Random(1), "t").prompt


def test_judgement_walks_the_checks_with_a_running_total():
    assert world.judgement(META["animals"], "cat, owl") == (
        "kind animals animals yes 1, count 2 2 yes 2, case lowercase lowercase yes 3, open > none no 3, "
        "format commas . commas none no 3\nScore: 3")
    assert world.judgement(META["body"], "hello") == "kind body parts none no 0\nScore: 0"


def test_seen_names_what_the_response_does_in_the_prompts_words():
    meta = META["animals"]  # 2 animals, lowercase, open '>', commas, end '.'
    assert world.asked(meta) == {"kind": "animals", "count": "2", "case": "lowercase", "open": ">", "format": "commas ."}
    assert world.seen(meta, "> bee, cat.") == world.asked(meta)
    assert world.seen(meta, "* BEE; CAT; PEN!") == {"kind": "mixed", "count": "3", "case": "capitals", "open": "*",
                                                 "format": "semicolons !"}
    assert world.seen(meta, "bee, Cat - owl..")["case"] == "mixed"
    assert world.seen(meta, "bee, Cat - owl..")["format"] == "mixed other"
    assert world.seen(meta, "owl")["format"] == "commas none"  # one item: no separator to get wrong
    assert world.seen(meta, "hello") is None


def test_degrade_hits_every_level_for_every_family():
    rng = random.Random(0)
    failed = Counter()
    for family in world.FAMILIES:
        for seed in range(60):
            task = world.make_task(family, random.Random(seed), f"t{seed}")
            assert world.oracle_score(task, task.gold) == 5
            for target in range(6):
                g = world.grade(task, world.degrade(task, target, rng))
                assert g.score == target
                failed.update(c for c, ok in zip(world.CHECKS, g.checks) if not ok)
    # every check fails on its own often: the judge learns each one, not a shortcut
    assert min(failed[c] for c in world.CHECKS) > 0.5 * max(failed.values())


def test_off_topic_responses_look_like_the_samplers():
    """The judge learns to call off topic by looking at the words: most designed off-topic responses keep the asked
    format (separator and end mark) and hold the kind's words misspelt, as a sampler writes them; sentences stay."""
    rng = random.Random(0)
    task = world.make_task("animals", random.Random(3), "t")
    sep = {"commas": ", ", "dashes": " - ", "slashes": " / ", "semicolons": "; ", "bars": " | "}[task.meta["sep"]]
    responses = [world.degrade(task, 0, rng) for _ in range(400)]
    assert all(world.judgement(task, r) == "kind animals none no 0\nScore: 0" for r in responses)
    words = {w for ws in world.KINDS.values() for w in ws}

    def formatted(r: str) -> bool:  # items joined by the asked separator, then the asked end mark
        body = re.sub(r"^[>*+#~] ", "", r)
        return body.endswith(task.meta["end"]) and all(re.fullmatch(r"[A-Za-z]+", x)
                                                       for x in body[:-1].split(sep))

    shaped = [r for r in responses if formatted(r)]
    misspelt = [r for r in shaped if any(w.lower() not in words for w in re.findall(r"[A-Za-z]+", r))]
    assert 0.6 < len(shaped) / len(responses) < 0.85 and len(misspelt) > 0.4 * len(responses)


def test_degrade_rejects_bad_level():
    with pytest.raises(ValueError):
        world.degrade(META["animals"], 6, random.Random(0))


_TASKS = [META[f] for f in world.FAMILIES] + [world.make_task(f, random.Random(i), "h").meta
                                          for i, f in enumerate(world.FAMILIES * 2)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_TASKS), st.text())
def test_oracle_never_raises(meta, response):
    g = world.grade(meta, response)
    assert g.score in range(6) and g.score == world.oracle_score(meta, response)
    assert len(g.reason.split()) <= 30


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(_TASKS), st.lists(st.sampled_from(["cat", "dog", "jam", "pen", "egg", "MUG", "toe", "x",
                                                          ",", " ", ".", " - ", "!", "?", " / ", ":", "> ", "*"]),
                                         max_size=12))
def test_oracle_on_near_miss_text(meta, parts):
    assert world.oracle_score(meta, " ".join(parts)) in range(6)
    assert world.oracle_score(meta, "".join(parts)) in range(6)


def test_oracle_non_string_response_scores_zero():
    assert world.oracle_score(META["animals"], None) == 0


def test_make_tasks_balanced_unique_and_deterministic():
    a = world.make_tasks(50, random.Random(3), "x")
    b = world.make_tasks(50, random.Random(3), "x")
    assert a == b
    assert Counter(t.family for t in a) == {"animals": 13, "foods": 13, "tools": 12, "body": 12}
    assert len({t.prompt for t in a}) == 50 and len({t.id for t in a}) == 50


def _judge_text(prompt, response):
    return f"Rate the response.\nQuestion: {prompt}\nResponse: {response}"


SMALL = World(num_ift=40, num_eft=90, prompts_per_iteration=15, num_validation=10, num_test=20)


def test_build_world_is_byte_identical(tmp_path):
    a = world.build_world(World(), 7, _judge_text, tmp_path / "a", iterations=[1, 2, 3])
    b = world.build_world(World(), 7, _judge_text, tmp_path / "b", iterations=[1, 2, 3])
    assert sorted(a) == sorted(b) == sorted(["ift", "eft", "validation", "test", "judge_eval",
                                             "prompts_1", "prompts_2", "prompts_3"])
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    world.build_world(World(), 8, _judge_text, tmp_path / "c", iterations=[1, 2, 3])
    assert tree_hash(tmp_path / "c") != tree_hash(tmp_path / "a")


def test_build_world_ignores_hash_seed(tmp_path):
    code = ("import sys; from harness.config import World; from harness.data.world import build_world; "
            "build_world(World(num_ift=30, num_eft=30), 3, lambda p, r: p + r, sys.argv[1], [1, 2])")
    for k, hash_seed in enumerate(("0", "12345")):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(k))], check=True,
                       env={"PYTHONHASHSEED": hash_seed, "PATH": ""}, cwd=Path(__file__).parents[1])
    assert tree_hash(tmp_path / "0") == tree_hash(tmp_path / "1")


def test_build_world_splits(tmp_path):
    cfg = World()
    paths = world.build_world(cfg, 1, _judge_text, tmp_path, iterations=[1, 2])
    rows = {name: (read_jsonl(p) if name == "judge_eval" else sft.read_sft(p)) for name, p in paths.items()}
    assert {k: len(v) for k, v in rows.items() if k != "judge_eval"} == {
        "ift": cfg.num_ift, "eft": cfg.num_eft, "validation": cfg.num_validation, "test": cfg.num_test,
        "prompts_1": cfg.prompts_per_iteration, "prompts_2": cfg.prompts_per_iteration}

    # Gold answers score 5 from the record alone; prompt files carry no answer.
    for name in ("ift", "validation", "test"):
        for r in rows[name]:
            assert world.score_record(r, sft.gold_response(r)) == 5
    for name in ("prompts_1", "prompts_2"):
        assert all(sft.gold_response(r) is None and r["meta"]["family"] in world.FAMILIES for r in rows[name])

    # No prompt text in two splits (nor twice in one).
    prompts = {name: [sft.user_text(r) for r in rs] for name, rs in rows.items() if name not in ("eft", "judge_eval")}
    prompts["eft"] = [r["meta"]["prompt"] for r in rows["eft"]]
    prompts["judge_eval"] = sorted({r["prompt"] for r in rows["judge_eval"]})
    every = [p for ps in prompts.values() for p in ps]
    assert len(every) == len(set(every))

    # EFT: judge prompts from the caller's template, targets "reason\nScore: X" true to the oracle, balanced scores.
    scores = Counter()
    for r in rows["eft"]:
        meta, target = r["meta"], sft.gold_response(r)
        assert sft.user_text(r) == _judge_text(meta["prompt"], meta["response"])
        reason, score_line = target.split("\n")
        assert score_line == f"Score: {meta['oracle_score']}"
        assert world.score_record(r, meta["response"]) == meta["oracle_score"]
        assert len(reason.split()) <= 30
        scores[meta["oracle_score"]] += 1
    assert set(scores) == set(range(6)) and max(scores.values()) - min(scores.values()) <= len(world.FAMILIES)
    cells = Counter((r["meta"]["family"], r["meta"]["oracle_score"]) for r in rows["eft"])
    assert len(cells) == 24 and max(cells.values()) - min(cells.values()) <= 1

    # judge_eval: num_test // 4 prompts, 2-3 responses of distinct quality each, scores true to the oracle.
    by_task = {}
    for r in rows["judge_eval"]:
        assert set(r) >= {"id", "prompt", "response", "oracle_score", "family", "meta"}
        assert world.score_record(r, r["response"]) == r["oracle_score"]
        by_task.setdefault(r["task_id"], []).append(r["oracle_score"])
    assert len(by_task) == cfg.num_test // 4
    assert all(2 <= len(s) <= 3 and len(set(s)) == len(s) for s in by_task.values())


def test_eval_splits_do_not_move_when_training_splits_grow(tmp_path):
    world.build_world(SMALL, 5, _judge_text, tmp_path / "a", iterations=[1])
    bigger = World(num_ift=80, num_eft=30, prompts_per_iteration=15, num_validation=10, num_test=20)
    world.build_world(bigger, 5, _judge_text, tmp_path / "b", iterations=[1, 2, 3])
    for name in ("test.jsonl", "validation.jsonl", "judge_eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_world_texts_cover_every_character(tmp_path):
    texts = world.world_texts(200, 0)
    assert texts == world.world_texts(200, 0)
    chars = set("".join(texts))
    paths = world.build_world(SMALL, 2, lambda p, r: f"{p}\n{r}", tmp_path, iterations=[1])
    for name, p in paths.items():
        rs = read_jsonl(p)
        values = ([r["prompt"] + r["response"] for r in rs] if name == "judge_eval"
                  else [t["value"] for r in rs for t in r["conversations"]])
        assert set("".join(values)) <= chars, name


def _meta_text(prompt, response, a, b):
    return f"Which?\nQ: {prompt}\nA: {response}\nJudgement A: {a}\nJudgement B: {b}"


def test_mft_seed_true_judgement_wins_balanced_and_moves_only_the_iteration_prompts(tmp_path):
    cfg = World(num_ift=40, num_eft=60, num_mft=48, prompts_per_iteration=15, num_validation=10, num_test=20)
    with_mft = world.build_world(cfg, 5, _judge_text, tmp_path / "a", [1, 2], _meta_text)
    without = world.build_world(cfg, 5, _judge_text, tmp_path / "b", [1, 2])
    assert set(with_mft) - set(without) == {"mft"}
    for name in without:  # the meta-judge seed moves only the iteration prompts, drawn after it
        if not name.startswith("prompts_"):
            assert tree_hash(with_mft[name]) == tree_hash(without[name]), name
    rows = sft.read_sft(with_mft["mft"])
    assert len(rows) == 48
    winners, scores = Counter(), Counter()
    other_prompts = {sft.user_text(r) for n in ("ift", "test", "validation", "prompts_1", "prompts_2")
                     for r in sft.read_sft(with_mft[n])}
    for r in rows:
        meta, target = r["meta"], sft.gold_response(r)
        assert meta["prompt"] not in other_prompts
        text = sft.user_text(r)
        a = text.split("Judgement A: ")[1].split("\nJudgement B: ")[0]
        b = text.split("\nJudgement B: ")[1]
        right = world.grade(meta, meta["response"]).reason
        assert world.score_record(r, meta["response"]) == meta["oracle_score"]
        assert a != b and (a if meta["winner"] == "A" else b) == right
        assert target.endswith(f"Winner: Judgement {meta['winner']}")
        assert parse.parse_winner(target) == meta["winner"]
        winners[meta["winner"]] += 1
        scores[meta["oracle_score"]] += 1
    assert winners["A"] == winners["B"] == 24 and set(scores) == set(range(6))
    assert len({(r["meta"]["family"], r["meta"]["oracle_score"], r["meta"]["winner"]) for r in rows}) == 48


def test_sft_data_does_not_move_with_the_iteration_prompts(tmp_path):
    # A sweep over prompts_per_iteration (or iterations) must compare equal M1s: the SFT splits stay byte-identical.
    # Default sizes: the task space is small enough there that the splits' draws collide.
    a = world.build_world(World(prompts_per_iteration=128), 1234, _judge_text, tmp_path / "a", [1, 2, 3], _meta_text)
    b = world.build_world(World(prompts_per_iteration=512), 1234, _judge_text, tmp_path / "b", [1, 2, 3, 4], _meta_text)
    for name in ("ift", "eft", "mft", "test", "validation", "judge_eval"):
        assert tree_hash(a[name]) == tree_hash(b[name]), name
    assert len(sft.read_sft(b["prompts_1"])) == 512


def test_named_end_marks_say_the_name_in_prompt_and_judgement():
    meta = {**META["foods"], "end_marks": "names"}  # 3 foods, capitals, open '*', dashes, end '!'
    assert world.gold_answer(meta) == "* BUN - EGG - FIG!"  # responses still end with the symbol
    assert world.asked(meta)["format"] == "dashes exclamation"
    assert world.seen(meta, "* BUN - EGG - FIG.")["format"] == "dashes period"
    assert world.seen(meta, "* BUN - EGG - FIG")["format"] == "dashes none"
    assert world.judgement(meta, "* BUN - EGG - FIG?").endswith(
        "format dashes exclamation dashes question no 4\nScore: 4")
    task = world.make_task("foods", random.Random(2), "t", end_marks="names")
    phrase = {".": "a period", "!": "an exclamation mark", "?": "a question mark", ":": "a colon"}
    assert task.prompt.endswith(f"and end with {phrase[task.meta['end']]}")
    # the same draws as the default: only the end mark's wording differs, and the default's records carry no new key
    plain = world.make_task("foods", random.Random(2), "t")
    assert "end_marks" not in plain.meta and plain.gold == task.gold
    assert plain.prompt == task.prompt.replace(phrase[task.meta["end"]], task.meta["end"])


STYLES = [{"end_marks": "names"}, {"kind_check": "items"}]  # the world's non-default ways of writing a judgement


@pytest.mark.parametrize("style", STYLES)
def test_every_level_and_the_oracles_judgement_reads_right_in_each_style(style):
    rng = random.Random(0)
    for family in world.FAMILIES:
        for seed in range(15):
            task = world.make_task(family, random.Random(seed), f"t{seed}", **style)
            assert world.oracle_score(task, task.gold) == 5
            for target in range(6):
                response = world.degrade(task, target, rng)
                grade = world.grade(task, response)
                assert grade.score == target
                steps = world.read_checklist(task, world.judgement(task, response), response)
                assert (steps is None) == (target == 0)
                if steps is not None:  # the oracle's own judgement: right verdicts, echoes and looks
                    assert [v[0] for v in steps.values()] == list(grade.checks)
                    assert all(v[1] and v[2] for v in steps.values())


# what each style's EFT targets say that the default's do not
GOLD_SAYS = {"end_marks": lambda g: "format" not in g or any(f" {n}" in g for n in ("period", "exclamation",
                                                                                    "question", "colon")),
             "kind_check": lambda g: re.match(r"kind [a-z ]+ \[", g) is not None}


@pytest.mark.parametrize("style", STYLES)
def test_build_world_in_each_style(tmp_path, style):
    (key, value), = style.items()
    default = world.build_world(World(num_ift=8, num_eft=12), 7, _judge_text, tmp_path / "a", iterations=[1])
    styled = world.build_world(World(num_ift=8, num_eft=12, **style), 7, _judge_text, tmp_path / "b", iterations=[1])
    a, b = read_jsonl(default["eft"]), read_jsonl(styled["eft"])
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(r["meta"][key] == value for r in b) and not any(key in r["meta"] for r in a)
    assert all(GOLD_SAYS[key](sft.gold_response(r)) for r in b)
    assert world.world_texts(20, 0, **style) != world.world_texts(20, 0)


def test_item_by_item_kind_check_copies_each_item_then_calls_it():
    meta = {**META["animals"], "kind_check": "items"}  # 2 animals, lowercase, open '>', commas, end '.'
    assert world.judgement(meta, "> cat, dgo.") == (
        "kind animals [cat ok dgo bad] mixed no 0, count 2 2 yes 1, case lowercase lowercase yes 2, open > > yes 3, "
        "format commas . commas . yes 4\nScore: 4")
    assert world.judgement(meta, "> dgo, egg.") == "kind animals [dgo bad egg bad] none no 0\nScore: 0"
    assert world.judgement(meta, "") == "kind animals [] none no 0\nScore: 0"
    listed = world.grade(meta, ", ".join(["cat"] * 12)).reason  # at most ITEMS_LISTED items, then "..."
    assert listed.startswith("kind animals [" + "cat ok " * world.ITEMS_LISTED + "...] animals yes 1, count 2 12 no 1")
    # the scores, checks and the other checks' words are the default's: only the kind check's look is longer
    for response in ("> bee, cat.", "> cat, dgo.", "CAT, OWL, PIG", "> dgo, egg.", "Sure! cat, owl."):
        a, b = world.grade(META["animals"], response), world.grade(meta, response)
        assert (a.score, a.checks) == (b.score, b.checks)
        assert a.reason.split(", ")[1:] == b.reason.split(", ")[1:]
    # the same draws as the default (prompt and gold), and a judge that lists the items but calls the look wrong is
    # read as a wrong look, not as off topic
    for family in world.FAMILIES:
        for seed in range(15):
            task = world.make_task(family, random.Random(seed), f"t{seed}", kind_check="items")
            plain = world.make_task(family, random.Random(seed), f"t{seed}")
            assert task.prompt == plain.prompt and task.gold == plain.gold and "kind_check" not in plain.meta
    steps = world.read_checklist(meta, "kind animals [cat ok dgo ok] animals yes 1, count 2 2 yes 2", "> cat, dgo.")
    assert steps["kind"] == (True, True, False)
