"""The embedded default's synthetic task world: five instruction families, gold answers and a 0-5 oracle.

    build_world(cfg.world, cfg.seed, judge_text_fn, "data/world", iterations=[1, 2])

A tiny Llama trained for minutes on CPU must learn both to answer and to judge, and the user must be able to see
whether self-rewarding improved the policy and the judge. So prompts and answers are short, every task has a gold
answer, and an oracle grades any response on the papers' additive 0-5 scale, one point per criterion:

    +1 relevant     uses the task's own elements (its items or words), or gives a number
    +1 substantial  at least half right (items in place / words in uppercase / number near the sum or count)
    +1 basic        the basic elements right (the right items / every word in order / number close)
    +1 complete     the content exactly right
    +1 impeccable   exactly the gold string: the requested format and nothing extra

Families, easiest first: upper, reverse, sort, count, add. `meta` holds the task's inputs only (the gold is derived
from them), so a prompt file carries no answer text, and `score_record(record, response)` works from a jsonl record.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.sft import make_record, write_sft
from harness.io import write_jsonl

FAMILIES = ("upper", "reverse", "sort", "count", "add")
SCORES = range(6)

# No a/i (English one-letter words would read as items), no l/o/0/1 (look-alikes).
_SYMBOLS = "bcdefghjkmnpqrstuvwxyz23456789"
_WORDS = ("cat", "dog", "sun", "map", "cup", "hat", "pen", "box", "fox", "egg", "jam", "kit", "log", "net", "owl",
          "pig", "rug", "van", "web", "yak", "bee", "car", "fig", "gum", "ink", "key", "leg", "mud", "nut", "oak",
          "pie", "ram", "sky", "toe", "bus", "bed", "cow", "jar", "lip", "mop")
_COUNT_LETTERS = "abcdef"
_WRAPS = ("The answer is: {}", "Answer: {}", "{}.", "Sure! Here it is: {}", "Result: {}")
_OFF_TOPIC = ("I do not know.", "Sorry, I cannot help with that.", "Hello! How are you today?", "Maybe later.",
              "That is a good question.", "Please ask me something else.")

_SYMBOL_RE = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9](?![A-Za-z0-9])")
_UINT_RE = re.compile(r"(?<![0-9])[0-9]+(?![0-9])")
_INT_RE = re.compile(r"-?[0-9]+")
_WORD_RE = re.compile(r"[A-Za-z]+")


@dataclass
class Task:
    id: str
    family: str
    prompt: str  # the user turn
    gold: str  # the answer that scores 5
    meta: dict  # the task's inputs, JSON-serialisable; enough for the oracle


@dataclass(frozen=True)
class Grade:
    score: int  # 0..5
    reason: str  # a short truthful sentence (< 15 words): what the oracle saw


# ----------------------------------------------------------------------------------------------------- graders
def _grade_sequence(given: list[str], gold: list[str], response: str) -> Grade:
    n = len(gold)
    if not set(given) & set(gold):
        return Grade(0, "None of the given items appear.")
    k = sum(a == b for a, b in zip(given, gold))
    right_items = Counter(given) == Counter(gold)
    correct = given == gold
    exact = response.strip() == " ".join(gold)
    tail = "exact format" if exact else "correct, inexact format" if correct else "incorrect"
    reason = f"Relevant; {k} of {n} in place; {'right' if right_items else 'wrong'} items; {tail}."
    return Grade(1 + (2 * k >= n) + right_items + correct + exact, reason)


def _grade_reverse(meta: dict, response: str) -> Grade:
    return _grade_sequence(_SYMBOL_RE.findall(response), _gold_items(meta), response)


def _grade_sort(meta: dict, response: str) -> Grade:
    return _grade_sequence(_UINT_RE.findall(response), _gold_items(meta), response)


def _grade_upper(meta: dict, response: str) -> Grade:
    words, up = meta["words"], [w.upper() for w in meta["words"]]
    pool = set(words)
    hits = [t for t in _WORD_RE.findall(response) if t.lower() in pool]
    if not hits:
        return Grade(0, "None of the given words appear.")
    n = len(words)
    k = sum(u in hits for u in up)
    in_order = [h.lower() for h in hits] == words
    correct = hits == up
    exact = response.strip() == ", ".join(up)
    tail = "exact format" if exact else "correct, inexact format" if correct else "incorrect"
    reason = f"Relevant; {k} of {n} uppercase; {'words in order' if in_order else 'wrong words or order'}; {tail}."
    return Grade(1 + (2 * k >= n) + in_order + correct + exact, reason)


def _grade_number(response: str, gold: int, near: int, close: int) -> Grade:
    found = _INT_RE.findall(response)
    if not found:
        return Grade(0, "No number in the answer.")
    last = found[-1]  # the answer is the last number: "23 + 45 = 68" answers 68
    # int() of a huge digit string is slow (and refused past 4300 digits): anything that long is far off anyway.
    d = abs(int(last) - gold) if len(last) <= 12 else None
    shown = last if len(last) <= 6 else "a long number"
    if d is None or d > near:
        return Grade(1, f"Answer {shown}, far off.")
    exact = response.strip() == str(gold)
    if d == 0:
        return Grade(4 + exact, f"Answer {shown}, correct; {'exact format' if exact else 'inexact format'}.")
    return Grade(2 + (d <= close), f"Answer {shown}, off by {d}; {'close' if d <= close else 'near'}.")


def _grade_count(meta: dict, response: str) -> Grade:
    return _grade_number(response, int(_gold_count(meta)), near=2, close=1)


def _grade_add(meta: dict, response: str) -> Grade:
    return _grade_number(response, sum(meta["operands"]), near=10, close=2)


# ------------------------------------------------------------------------------------------- task generators
def _gold_items(meta: dict) -> list[str]:
    if meta["family"] == "reverse":
        return list(reversed(meta["items"]))
    return [str(x) for x in sorted(meta["items"])]


def _gold_count(meta: dict) -> str:
    return str(meta["seq"].count(meta["letter"]))


def _sample_count(rng: random.Random) -> dict:
    letter = rng.choice(_COUNT_LETTERS)
    others = [c for c in _COUNT_LETTERS if c != letter]
    seq = [letter if rng.random() < 0.3 else rng.choice(others) for _ in range(rng.randint(4, 9))]
    return {"letter": letter, "seq": seq}


@dataclass(frozen=True)
class _Family:
    sample: Callable[[random.Random], dict]  # the inputs (without "family")
    prompt: Callable[[dict], str]
    gold: Callable[[dict], str]
    grade: Callable[[dict, str], Grade]
    degrade: Callable[[dict, int, random.Random], str]  # a candidate response aimed at a score


def _wrap(body: str, rng: random.Random) -> str:
    return rng.choice(_WRAPS).format(body) if rng.random() < 0.5 else body


def _degrade_sequence(gold: list[str], foreign: list[str], target: int, rng: random.Random) -> str:
    n, seq = len(gold), list(gold)
    if target == 5:
        return " ".join(gold)
    if target == 4:
        return rng.choice([", ".join(gold), rng.choice(_WRAPS).format(" ".join(gold)),
                           rng.choice(_WRAPS).format(", ".join(gold))])
    if target == 3:  # one adjacent swap: n - 2 >= n / 2 in place for n >= 4, right items
        i = rng.randrange(n - 1)
        seq[i], seq[i + 1] = seq[i + 1], seq[i]
    elif target == 2:  # right items mostly out of place, or mostly in place with an item wrong or missing
        way = rng.randrange(3)
        if way == 0:
            rng.shuffle(seq)
        elif way == 1:
            seq[rng.randrange(n)] = rng.choice(foreign)
        else:
            seq.pop()
    elif target == 1:  # a few of the items, out of place
        seq = rng.sample(gold, rng.randint(1, (n - 1) // 2)) + rng.sample(foreign, rng.randint(0, 1))
        rng.shuffle(seq)
    else:
        return rng.choice(_OFF_TOPIC) if rng.random() < 0.5 else " ".join(rng.sample(foreign, rng.randint(1, 3)))
    return _wrap(" ".join(seq), rng)


def _degrade_reverse(meta: dict, target: int, rng: random.Random) -> str:
    return _degrade_sequence(_gold_items(meta), [s for s in _SYMBOLS if s not in meta["items"]], target, rng)


def _degrade_sort(meta: dict, target: int, rng: random.Random) -> str:
    foreign = [str(x) for x in range(100) if x not in meta["items"]]
    return _degrade_sequence(_gold_items(meta), foreign, target, rng)


def _degrade_upper(meta: dict, target: int, rng: random.Random) -> str:
    words, up = meta["words"], [w.upper() for w in meta["words"]]
    n = len(words)
    if target == 5:
        return ", ".join(up)
    if target == 4:
        return rng.choice([" ".join(up), ",".join(up), rng.choice(_WRAPS).format(", ".join(up))])
    if target == 3:  # every word in order, at least half but not all in uppercase
        lower = set(rng.sample(range(n), rng.randint(1, n - (n + 1) // 2)))
        return ", ".join(w if i in lower else u for i, (w, u) in enumerate(zip(words, up)))
    if target == 2:
        way, seq = rng.randrange(3), list(up)
        if way == 0:
            seq = list(words)
        elif way == 1:
            seq.pop(rng.randrange(n))
        else:
            i = rng.randrange(n - 1)
            seq[i], seq[i + 1] = seq[i + 1], seq[i]
        return _wrap(", ".join(seq), rng)
    if target == 1:
        return _wrap(", ".join(rng.sample(words, rng.randint(1, n - 1))), rng)
    return rng.choice(_OFF_TOPIC)


def _degrade_number(gold: int, near: int, close: int, target: int, rng: random.Random, echo: str = "") -> str:
    if target == 5:
        return str(gold)
    if target == 4:
        return f"{echo} = {gold}" if echo and rng.random() < 0.3 else rng.choice(_WRAPS).format(gold)
    if target == 0:
        return rng.choice(_OFF_TOPIC)
    lo, hi = {3: (1, close), 2: (close + 1, near), 1: (near + 1, near + 20)}[target]
    d = rng.randint(lo, hi)
    return _wrap(str(gold + d if gold - d < 0 or rng.random() < 0.5 else gold - d), rng)


def _degrade_count(meta: dict, target: int, rng: random.Random) -> str:
    return _degrade_number(int(_gold_count(meta)), 2, 1, target, rng)


def _degrade_add(meta: dict, target: int, rng: random.Random) -> str:
    ops = meta["operands"]
    return _degrade_number(sum(ops), 10, 2, target, rng, echo=" + ".join(map(str, ops)))


_SPECS: dict[str, _Family] = {
    "upper": _Family(
        sample=lambda rng: {"words": rng.sample(_WORDS, rng.randint(3, 5))},
        prompt=lambda m: f"Write these words in uppercase, separated by commas: {' '.join(m['words'])}",
        gold=lambda m: ", ".join(w.upper() for w in m["words"]),
        grade=_grade_upper, degrade=_degrade_upper),
    "reverse": _Family(
        sample=lambda rng: {"items": rng.sample(_SYMBOLS, rng.randint(4, 7))},
        prompt=lambda m: f"Reverse the order of this list: {' '.join(m['items'])}",
        gold=lambda m: " ".join(_gold_items(m)),
        grade=_grade_reverse, degrade=_degrade_reverse),
    "sort": _Family(
        sample=lambda rng: {"items": rng.sample(range(100), rng.randint(4, 6))},
        prompt=lambda m: f"Sort these numbers from smallest to largest: {' '.join(map(str, m['items']))}",
        gold=lambda m: " ".join(_gold_items(m)),
        grade=_grade_sort, degrade=_degrade_sort),
    "count": _Family(
        sample=_sample_count,
        prompt=lambda m: f"In the list {' '.join(m['seq'])}, how many times does {m['letter']} appear? "
                         "Give only the number.",
        gold=_gold_count,
        grade=_grade_count, degrade=_degrade_count),
    "add": _Family(
        sample=lambda rng: {"operands": [rng.randint(1, 60) for _ in range(rng.randint(2, 3))]},
        prompt=lambda m: f"What is {' + '.join(map(str, m['operands']))}? Give only the number.",
        gold=lambda m: str(sum(m["operands"])),
        grade=_grade_add, degrade=_degrade_add),
}


# ------------------------------------------------------------------------------------------------ public API
def _meta(task_or_meta: Task | dict) -> dict:
    return task_or_meta.meta if isinstance(task_or_meta, Task) else task_or_meta


def _spec(meta: dict) -> _Family:
    family = meta.get("family")
    if family not in _SPECS:
        raise ValueError(f"unknown task family {family!r}; expected one of {', '.join(FAMILIES)}")
    return _SPECS[family]


def make_task(family: str, rng: random.Random, task_id: str) -> Task:
    spec = _spec({"family": family})
    meta = {"family": family, **spec.sample(rng)}
    return Task(id=task_id, family=family, prompt=spec.prompt(meta), gold=spec.gold(meta), meta=meta)


def make_tasks(n: int, rng: random.Random, id_prefix: str, exclude: set[str] | None = None) -> list[Task]:
    """n tasks, families round-robin (task i is FAMILIES[i % 5]), ids f"{id_prefix}-{i:05d}".

    Prompts are unique within the list and never in `exclude`, which is updated with the new prompts (pass one set
    to every split to keep splits disjoint by prompt text).
    """
    seen = set() if exclude is None else exclude
    tasks = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        for _ in range(10_000):
            task = make_task(family, rng, f"{id_prefix}-{i:05d}")
            if task.prompt not in seen:
                break
        else:
            raise RuntimeError(f"world: ran out of unique {family} prompts after {len(seen)} prompts")
        seen.add(task.prompt)
        tasks.append(task)
    return tasks


def grade(task_or_meta: Task | dict, response: str) -> Grade:
    """The oracle's score and its reason. Deterministic, cheap, never raises on any response string."""
    if not isinstance(response, str):
        return Grade(0, "No answer.")
    meta = _meta(task_or_meta)
    return _spec(meta).grade(meta, response)


def oracle_score(task_or_meta: Task | dict, response: str) -> int:
    return grade(task_or_meta, response).score


def score_record(record: dict, response: str) -> int:
    """The oracle score of `response` to a world jsonl record (SFT or judge_eval): its `meta` is enough."""
    return oracle_score(record["meta"], response)


def gold_answer(task_or_meta: Task | dict) -> str:
    meta = _meta(task_or_meta)
    return _spec(meta).gold(meta)


def judgement(task_or_meta: Task | dict, response: str) -> str:
    """The EFT target: the oracle's short reason, then "Score: X" (what the judge parser reads)."""
    g = grade(task_or_meta, response)
    return f"{g.reason}\nScore: {g.score}"


def degrade(task_or_meta: Task | dict, target_score: int, rng: random.Random, max_tries: int = 200) -> str:
    """A response whose oracle score is exactly target_score (0..5), varied by rng."""
    if target_score not in SCORES:
        raise ValueError(f"target_score must be in 0..5, got {target_score}")
    meta = _meta(task_or_meta)
    spec = _spec(meta)
    for _ in range(max_tries):
        response = spec.degrade(meta, target_score, rng)
        if spec.grade(meta, response).score == target_score:
            return response
    raise RuntimeError(f"degrade: no response scoring {target_score} for {meta} after {max_tries} tries")


def _sft_rows(tasks: list[Task], with_gold: bool) -> list[dict]:
    return [make_record(t.prompt, t.gold if with_gold else None, id=t.id, meta=t.meta) for t in tasks]


def meta_judgement_example(t: Task, i: int, rng: random.Random) -> tuple[str, str, str, str, int]:
    """(response, judgement A, judgement B, target, oracle score) for a meta-judge seed example.

    One judgement is the oracle's reason for the response, the other the reason for a response of another score;
    Score lines are left out, as the meta-judge sees judgements (parse.strip_score). The true one is A for even i.
    """
    score = i % 6
    response = degrade(t, score, rng)
    right = grade(t, response).reason
    for _ in range(50):
        wrong = grade(t, degrade(t, rng.choice([s for s in SCORES if s != score]), rng)).reason
        if wrong != right:
            break
    else:
        raise RuntimeError(f"meta-judge seed: no distinct wrong judgement for task {t.id}")
    winner = "A" if i % 2 == 0 else "B"
    a, b = (right, wrong) if winner == "A" else (wrong, right)
    return response, a, b, f"Judgement {winner} fits the answer.\nWinner: Judgement {winner}", score


def build_world(world_cfg: Any, seed: int, judge_text_fn: Callable[[str, str], str], out_dir: str | Path,
                iterations: Iterable[int], meta_judge_text_fn: Callable[[str, str, str, str], str] | None = None
                ) -> dict[str, Path]:
    """Write the world's NeMo SFT jsonl splits (and judge_eval.jsonl) under out_dir; return {name: path}.

    Names: ift, eft, prompts_<t> for each self-rewarding iteration t (config.self_rewarding_iterations), validation,
    test, judge_eval, and mft (meta-judge seed) when
    meta_judge_text_fn is given and world_cfg.num_mft > 0. Same cfg + seed => byte-identical files.
    Splits are drawn evaluation-first, each from its own RNG, so growing ift or adding iterations leaves test,
    validation and judge_eval unchanged. No prompt text appears in two splits (nor twice in one).
    """
    out = Path(out_dir)
    seen: set[str] = set()

    def tasks(split: str, n: int) -> list[Task]:
        return make_tasks(n, random.Random(f"world:{seed}:{split}"), split, exclude=seen)

    paths: dict[str, Path] = {}

    def put(name: str, rows: list[dict], sft: bool = True) -> None:
        paths[name] = out / f"{name}.jsonl"
        (write_sft if sft else write_jsonl)(paths[name], rows)

    put("test", _sft_rows(tasks("test", world_cfg.num_test), with_gold=True))
    put("validation", _sft_rows(tasks("validation", world_cfg.num_validation), with_gold=True))

    rng = random.Random(f"world:{seed}:judge_eval:responses")
    rows = []
    for t in tasks("judge_eval", max(1, world_cfg.num_test // 2)):
        for j, s in enumerate(rng.sample(SCORES, rng.choice((2, 3)))):
            rows.append({"id": f"{t.id}-r{j}", "task_id": t.id, "prompt": t.prompt, "response": degrade(t, s, rng),
                         "oracle_score": s, "family": t.family, "meta": t.meta})
    put("judge_eval", rows, sft=False)

    put("ift", _sft_rows(tasks("ift", world_cfg.num_ift), with_gold=True))

    # EFT: task i is family i % 5 and gets score i % 6, so (family, score) cells are balanced too.
    rng = random.Random(f"world:{seed}:eft:responses")
    rows = []
    for i, t in enumerate(tasks("eft", world_cfg.num_eft)):
        response = degrade(t, i % 6, rng)
        rows.append(make_record(judge_text_fn(t.prompt, response), judgement(t, response), id=t.id,
                                meta={**t.meta, "prompt": t.prompt, "response": response, "oracle_score": i % 6}))
    rng.shuffle(rows)
    put("eft", rows)

    for it in iterations:
        put(f"prompts_{it}", _sft_rows(tasks(f"iter{it}", world_cfg.prompts_per_iteration), with_gold=False))

    # MFT (meta-judge seed): a tiny model never sees a meta-judge prompt otherwise, and never answers one.
    # Drawn after every other split, so adding it leaves them unchanged.
    num_mft = getattr(world_cfg, "num_mft", 0)
    if meta_judge_text_fn is not None and num_mft > 0:
        rng = random.Random(f"world:{seed}:mft:responses")
        rows = []
        for i, t in enumerate(tasks("mft", num_mft)):
            response, a, b, target, score = meta_judgement_example(t, i, rng)
            rows.append(make_record(meta_judge_text_fn(t.prompt, response, a, b), target, id=t.id,
                                    meta={**t.meta, "prompt": t.prompt, "response": response, "oracle_score": score,
                                          "winner": target[-1]}))
        rng.shuffle(rows)
        put("mft", rows)
    return paths


def world_texts(n: int, seed: int) -> list[str]:
    """Text to train the tokenizer on: n tasks' prompts, gold answers, responses at every level, judgements."""
    rng = random.Random(f"world:{seed}:texts")
    texts = []
    for i, t in enumerate(make_tasks(n, rng, "text")):
        response = degrade(t, i % 6, rng)
        texts += [t.prompt, t.gold, response, judgement(t, response)]
    chars = "".join(chr(c) for c in range(33, 127))
    return texts + [" ".join(_OFF_TOPIC), " ".join(_WRAPS), chars]
