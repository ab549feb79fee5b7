"""The embedded default's synthetic task world: lists of a kind under verifiable instructions, and a 0-5 checklist
oracle.

    build_world(cfg.world, cfg.seed, judge_text_fn, "data/world", iterations=[1, 2])

Self-rewarding rests on one premise: the model judges better than it answers. So every task asks for k words of a
kind under verifiable instructions, in the manner of IFEval: "Name 3 animals in capitals. Open with + then separate
with commas and end with !". Each point of the papers' additive 0-5 scale is one local check of the response:

    +1 relevant     kind    every item is a word of the asked kind (animals, foods, tools, body parts)
    +1 substantial  count   exactly k items
    +1 basic        case    every item in the asked casing (capitals, lowercase, capitalized)
    +1 complete     open    the response opens with the asked symbol
    +1 impeccable   format  the items joined by the asked separator, then the asked end mark, nothing else

Meeting all five at once is hard for a sampler (one wrong token breaks a check); checking any one is a look at the
response next to one value of the prompt. A response with no word of the kind is off topic and scores 0. Nothing
needs copying an arbitrary word from the prompt (which tiny models learn slowly): every asked value is one of a few,
and a word's kind and casing are properties of the word itself. The judge's target (EFT) walks the checks in order:
for each, the prompt's words for the asked value (a copy), the response's value in the same words (a look), then
yes/no (a comparison of the two adjacent values) and a running total, so the final `Score: N` is the last total:
"kind animals animals yes 1, count 3 3 yes 2, case capitals mixed no 2, open + + yes 3, format commas ! commas . no 3
\\nScore: 3" (each check: its name, the asked value, the response's value, yes/no, the total).
With world.end_marks=names the prompt names the end mark ("end with an exclamation mark") and the judgement writes
its name ("format commas exclamation commas period no 3"), a word only the prompt holds, as the separators' names are.
With world.kind_check=items the kind check's look goes item by item: each item of the response copied, then ok or
bad ("kind animals [cat ok dgo bad] mixed no 0"), so the look is a property of the word just written, not a verdict
on every item at once (the step that bounded M1's judge on its own samples).

Families are the kinds. `meta` holds the task's inputs only (the gold is derived from them), so a prompt file
carries no answer text, and `score_record(record, response)` works from a jsonl record.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.sft import make_record, write_sft
from harness.io import write_jsonl

FAMILIES = ("animals", "foods", "tools", "body")
SCORES = range(6)
CHECKS = ("kind", "count", "case", "open", "format")  # the rubric's five points, in order
OFF_TOPIC = "none"  # the kind check's look when the response holds no word of the kind: the checklist ends, score 0

# Single-token words (as the tokenizer learns them): a kind is a property of a word, known without the prompt.
KINDS = {
    "animals": ("ant", "ape", "bat", "bee", "cat", "cow", "dog", "eel", "elk", "emu", "fox", "hen", "hog", "owl",
                "pig", "rat", "yak"),
    "foods": ("bun", "egg", "fig", "ham", "jam", "nut", "oat", "pea", "pie", "tea", "yam", "soy"),
    "tools": ("axe", "saw", "pin", "pen", "mop", "net", "tap", "jug", "pot", "pan", "cup", "mug"),
    "body": ("arm", "ear", "eye", "hip", "jaw", "leg", "lip", "rib", "toe", "gum"),
}
_WORDS = tuple(w for ws in KINDS.values() for w in ws)
_PHRASE = {"body": "body parts"}  # how a kind is named in prompts and judgements
_CASES = {"capitals": str.upper, "lowercase": str.lower, "capitalized": str.capitalize}
_OPENS = (">", "*", "+", "#", "~")
_SEPS = {"commas": ", ", "dashes": " - ", "slashes": " / ", "semicolons": "; ", "bars": " | "}
_ENDS = (".", "!", "?", ":")
# world.end_marks=names: prompts name the end mark and judgements echo its name, a word found only in the prompt (as
# the separators' names are), not a symbol the response ends with too (judges at M1 copied the response's end mark).
_END_NAMES = {".": "period", "!": "exclamation", "?": "question", ":": "colon"}
_END_PHRASES = {".": "a period", "!": "an exclamation mark", "?": "a question mark", ":": "a colon"}
_OFF_TOPIC = ("I do not know.", "Sorry, I cannot help with that.", "Hello! How are you today?", "Maybe later.",
              "That is a good question.", "Please ask me something else.")
_ITEM_RE = re.compile(r"[A-Za-z]+")
ITEMS_LISTED = 8  # world.kind_check=items: the judgement lists at most this many items, then "..."
_OPEN_RE = re.compile(r"([>*+#~]) ")


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
    reason: str  # a short truthful line: each check, its result and the running total
    checks: tuple[bool, ...] = ()  # the five checks (CHECKS order); () when off topic


# ----------------------------------------------------------------------------------------------------- the checks
def _split(response: str) -> tuple[str | None, str]:
    """(the opening symbol or None, the body after it) of a stripped response."""
    text = response.strip()
    m = _OPEN_RE.match(text)
    return (m.group(1), text[2:]) if m else (None, text)


def _named_ends(meta: dict) -> bool:
    return meta.get("end_marks") == "names"  # absent in the default's records


def _end_word(meta: dict, end: str) -> str:
    """An end mark as the judgement writes it: the symbol, or its name with world.end_marks=names."""
    return _END_NAMES[end] if _named_ends(meta) else end


def _look_prefix(meta: dict, response: str) -> str:
    """What the kind check writes between the asked kind and its look: nothing, or (world.kind_check=items) the
    response's items, each copied then called ok (a word of the asked kind) or bad."""
    if meta.get("kind_check") != "items":
        return ""
    kind = set(KINDS[meta["family"]])
    items = _ITEM_RE.findall(_split(response)[1])
    listed = [f"{w} {'ok' if w.lower() in kind else 'bad'}" for w in items[:ITEMS_LISTED]]
    return "[" + " ".join(listed + ["..."] * (len(items) > ITEMS_LISTED)) + "] "


def asked(meta: dict) -> dict[str, str]:
    """What the prompt asks, check by check, in the words the judgement echoes."""
    return {"kind": _PHRASE.get(meta["family"], meta["family"]), "count": str(meta["k"]), "case": meta["case"],
            "open": meta["open"], "format": f"{meta['sep']} {_end_word(meta, meta['end'])}"}


def seen(meta: dict, response: str) -> dict[str, str] | None:
    """What the response does, check by check, in the same words as `asked` (a check passes when they are equal);
    None when it holds no word of the asked kind (off topic). "mixed": not one value throughout; "other": a value
    the prompt language has no name for (a separator that is no asked one, an end that is no end mark)."""
    opened, body = _split(response)
    found = list(_ITEM_RE.finditer(body))
    items = [m.group() for m in found]
    kind = set(KINDS[meta["family"]])
    if not kind & {w.lower() for w in items}:
        return None
    cases = [c for c in (meta["case"], *sorted(_CASES)) if all(w == _CASES[c](w) for w in items)]
    gaps = [body[a.end():b.start()] for a, b in zip(found, found[1:])]
    seps = {text: name for name, text in _SEPS.items()}
    if body[:found[0].start()] or len(set(gaps)) > 1:
        sep = "mixed"
    else:  # one item: no separator to get wrong
        sep = seps.get(gaps[0], "other") if gaps else meta["sep"]
    tail = body[found[-1].end():]
    end = _end_word(meta, tail) if tail in _ENDS else "none" if not tail else "other"
    return {"kind": asked(meta)["kind"] if all(w.lower() in kind for w in items) else "mixed",
            "count": str(len(items)), "case": cases[0] if cases else "mixed", "open": opened or "none",
            "format": f"{sep} {end}"}


def checks(meta: dict, response: str) -> tuple[bool, ...] | None:
    """The five checks of `response` (CHECKS order): is what it does what the prompt asks; None when off topic."""
    did = seen(meta, response)
    want = asked(meta)
    return None if did is None else tuple(did[c] == want[c] for c in CHECKS)


def _spec(meta: dict) -> dict:
    if meta.get("family") not in FAMILIES:
        raise ValueError(f"unknown task family {meta.get('family')!r}; expected one of {', '.join(FAMILIES)}")
    return meta


# ----------------------------------------------------------------------------------------------------- tasks
def _prompt(meta: dict) -> str:
    case = {"capitals": "in capitals", "lowercase": "in lowercase", "capitalized": "capitalized"}[meta["case"]]
    end = _END_PHRASES[meta["end"]] if _named_ends(meta) else meta["end"]
    return (f"Name {meta['k']} {_PHRASE.get(meta['family'], meta['family'])} {case}. Open with {meta['open']} then separate with {meta['sep']} "
            f"and end with {end}")


def _valid_words(meta: dict) -> list[str]:
    """The kind's words in the gold's order (from meta's offset)."""
    ws = KINDS[meta["family"]]
    return list(ws[meta["offset"]:] + ws[:meta["offset"]])


def _gold_items(meta: dict) -> list[str]:
    return [_CASES[meta["case"]](w) for w in _valid_words(meta)[: meta["k"]]]


def _render(meta: dict, items: list[str], opening: str | None = None, sep: str | None = None,
            end: str | None = None) -> str:
    opening = meta["open"] if opening is None else opening
    body = (_SEPS[meta["sep"]] if sep is None else sep).join(items) + (meta["end"] if end is None else end)
    return f"{opening} {body}" if opening else body


def _sample(family: str, rng: random.Random, end_marks: str = "symbols", kind_check: str = "whole") -> dict:
    meta = {"family": family, "k": rng.randint(2, 6), "case": rng.choice(sorted(_CASES)),
            "open": rng.choice(_OPENS), "sep": rng.choice(sorted(_SEPS)), "end": rng.choice(_ENDS),
            "offset": rng.randrange(len(KINDS[family]))}
    if end_marks != "symbols":  # the default's records stay as they were
        meta["end_marks"] = end_marks
    if kind_check != "whole":
        meta["kind_check"] = kind_check
    return meta


# ----------------------------------------------------------------------------------------------------- degrade
def _misspell(word: str, rng: random.Random) -> str:
    """A non-word near `word`: a letter changed, dropped, doubled or added (may rarely be a word: callers verify)."""
    at, letter = rng.randrange(len(word)), rng.choice("abcdefghijklmnopqrstuvwxyz")
    return [word[:at] + letter + word[at + 1:], word[:at] + word[at + 1:] or letter, word[:at] + word[at] + word[at:],
            word + letter][rng.randrange(4)]


def _candidate(meta: dict, fail: set[str], rng: random.Random) -> str:
    """A response meant to fail exactly the checks in `fail` (the caller verifies with the oracle)."""
    valid = _valid_words(meta)
    items = rng.sample(valid, meta["k"])
    if "count" in fail:
        pool = [w for w in valid if w not in items] or valid
        if len(items) > 2 and rng.random() < 0.5:
            items.pop(rng.randrange(len(items)))
        else:
            items.insert(rng.randrange(len(items) + 1), rng.choice(pool))
    if "kind" in fail:  # words of another kind, or a word misspelt, as a sampler writes them
        foreign = [w for w in _WORDS if w not in valid]
        for at in rng.sample(range(len(items)), rng.randint(1, max(1, len(items) - 1))):
            items[at] = rng.choice(foreign) if rng.random() < 0.5 else _misspell(items[at], rng)
    case = _CASES[meta["case"]]
    cased = [case(w) for w in items]
    if "case" in fail:
        other = _CASES[rng.choice([c for c in sorted(_CASES) if c != meta["case"]])]
        for at in (range(len(items)) if rng.random() < 0.5 else [rng.randrange(len(items))]):
            cased[at] = other(items[at])
    opening, sep, end = meta["open"], _SEPS[meta["sep"]], meta["end"]
    if "open" in fail:
        opening = rng.choice([o for o in ("", *_OPENS) if o != opening])
    if "format" in fail:
        way = rng.randrange(4)
        if way == 0:
            sep = rng.choice([s for s in (*_SEPS.values(), " ", ",") if s != sep])
        elif way == 1:
            end = rng.choice([e for e in (*_ENDS, "", "..") if e != end])
        elif way == 2 and len(cased) > 1:
            i = rng.randrange(len(cased) - 1)
            wrong = rng.choice([s for s in (*_SEPS.values(), " ") if s != sep])
            body = sep.join(cased[: i + 1]) + wrong + sep.join(cased[i + 1:]) + end
            return f"{opening} {body}" if opening else body
        else:
            sep, end = rng.choice([s for s in (*_SEPS.values(), " ") if s != sep]), rng.choice(["", *_ENDS])
    return _render(meta, cased, opening, sep, end)


def _off_topic(meta: dict, rng: random.Random) -> str:
    """No word of the kind: a sentence, words of other kinds, or (most often, as a sampler writes them) the kind's
    words misspelt, in the asked format or near it, so the judge learns to look at the words, not the format."""
    way = rng.randrange(4)
    if way == 0:
        return rng.choice(_OFF_TOPIC)
    k = max(1, meta["k"] + rng.choice((-1, 0, 0, 1)))
    foreign = [w for w in _WORDS if w not in KINDS[meta["family"]]]
    if way == 1:
        items = rng.sample(foreign, min(k, 3))
    else:
        items = [_misspell(w, rng) if rng.random() < 0.75 else rng.choice(foreign)
                 for w in rng.choices(_valid_words(meta), k=k)]
    items = [_CASES[meta["case"] if rng.random() < 0.7 else rng.choice(sorted(_CASES))](w) for w in items]
    return _render(meta, items, opening=rng.choice(["", *_OPENS]) if rng.random() < 0.3 else None)


# ------------------------------------------------------------------------------------------------ public API
def _meta(task_or_meta: Task | dict) -> dict:
    return _spec(task_or_meta.meta if isinstance(task_or_meta, Task) else task_or_meta)


def make_task(family: str, rng: random.Random, task_id: str, end_marks: str = "symbols",
              kind_check: str = "whole") -> Task:
    meta = _sample(_spec({"family": family})["family"], rng, end_marks, kind_check)
    return Task(id=task_id, family=family, prompt=_prompt(meta), gold=_render(meta, _gold_items(meta)), meta=meta)


def make_tasks(n: int, rng: random.Random, id_prefix: str, exclude: set[str] | None = None,
               end_marks: str = "symbols", kind_check: str = "whole") -> list[Task]:
    """n tasks, families round-robin (task i is FAMILIES[i % 4]), ids f"{id_prefix}-{i:05d}".

    Prompts are unique within the list and never in `exclude`, which is updated with the new prompts (pass one set
    to every split to keep splits disjoint by prompt text).
    """
    seen = set() if exclude is None else exclude
    tasks = []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        for _ in range(10_000):
            task = make_task(family, rng, f"{id_prefix}-{i:05d}", end_marks, kind_check)
            if task.prompt not in seen:
                break
        else:
            raise RuntimeError(f"world: ran out of unique {family} prompts after {len(seen)} prompts")
        seen.add(task.prompt)
        tasks.append(task)
    return tasks


def grade(task_or_meta: Task | dict, response: str) -> Grade:
    """The oracle's score, its reason and the five checks. Deterministic, cheap, never raises on any string."""
    if not isinstance(response, str):
        return Grade(0, "No answer.")
    meta = _meta(task_or_meta)
    ok = checks(meta, response)
    if ok is None:  # the kind check's look finds no word of the kind: the checklist stops there
        return Grade(0, f"kind {asked(meta)['kind']} {_look_prefix(meta, response)}{OFF_TOPIC} no 0")
    # each check echoes the prompt's own words for what it asks, then names what the response does: the yes/no is a
    # comparison of two adjacent values, and every value is a copy (of the prompt) or a look (at the response)
    want, did = asked(meta), seen(meta, response)
    parts, total = [], 0
    for check, passed in zip(CHECKS, ok):
        total += passed
        look = (_look_prefix(meta, response) if check == "kind" else "") + did[check]
        parts.append(f"{check} {want[check]} {look} {'yes' if passed else 'no'} {total}")
    return Grade(total, ", ".join(parts), ok)


def read_checklist(task_or_meta: Task | dict, judgement_text: str, response: str
                   ) -> dict[str, tuple[bool | None, bool | None, bool | None]] | None:
    """What a judgement written in the oracle's checklist format says, check by check: {check: (verdict, echo,
    look)}: verdict = its yes/no, echo = whether the asked value it wrote is the prompt's, look = whether the value
    it says the response has is the response's (None for a check it left out, and look None when the oracle calls
    the response off topic). None when it calls the response off topic (its kind check sees "none").

    The judge's steps are read one by one, so telemetry can say which step fails: copying the asked value from the
    prompt (echo), looking at the response (look) or comparing the two (verdict).
    """
    meta = _meta(task_or_meta)
    text = judgement_text.strip()
    if re.match(rf"kind [^,]*? {OFF_TOPIC} no \d", text):  # the first check, not open's "none" further on
        return None
    want, did = asked(meta), seen(meta, response)
    out: dict[str, tuple[bool | None, bool | None, bool | None]] = {}
    for check in CHECKS:
        m = re.search(rf"\b{check} (.+?) (yes|no) \d", text)
        if m is None:
            out[check] = (None, None, None)
            continue
        said = m.group(1)
        out[check] = (m.group(2) == "yes", said.startswith(want[check] + " "),
                      None if did is None else said.endswith(" " + did[check]))
    return out


def oracle_score(task_or_meta: Task | dict, response: str) -> int:
    return grade(task_or_meta, response).score


def score_record(record: dict, response: str) -> int:
    """The oracle score of `response` to a world jsonl record (SFT or judge_eval): its `meta` is enough."""
    return oracle_score(record["meta"], response)


def gold_answer(task_or_meta: Task | dict) -> str:
    meta = _meta(task_or_meta)
    return _render(meta, _gold_items(meta))


def judgement(task_or_meta: Task | dict, response: str) -> str:
    """The EFT target: the oracle's checklist reason, then "Score: X" (what the judge parser reads)."""
    g = grade(task_or_meta, response)
    return f"{g.reason}\nScore: {g.score}"


def degrade(task_or_meta: Task | dict, target_score: int, rng: random.Random, max_tries: int = 400) -> str:
    """A response whose oracle score is exactly target_score (0..5), varied by rng: which checks fail is drawn
    uniformly among the 5 - target_score sized subsets, so the judge sees each check fail on its own."""
    if target_score not in SCORES:
        raise ValueError(f"target_score must be in 0..5, got {target_score}")
    meta = _meta(task_or_meta)
    for _ in range(max_tries):
        if target_score == 0:
            response = _off_topic(meta, rng)
        else:
            response = _candidate(meta, set(rng.sample(CHECKS, 5 - target_score)), rng)
        if grade(meta, response).score == target_score:
            return response
    raise RuntimeError(f"degrade: no response scoring {target_score} for {meta} after {max_tries} tries")


def _sft_rows(tasks: list[Task], with_gold: bool) -> list[dict]:
    return [make_record(t.prompt, t.gold if with_gold else None, id=t.id, meta=t.meta) for t in tasks]


def meta_judgement_example(t: Task, i: int, rng: random.Random) -> tuple[str, str, str, str, int]:
    """(response, judgement A, judgement B, target, oracle score) for a meta-judge seed example.

    One judgement is the oracle's reason for the response, the other the reason for a response of another score;
    Score lines are left out, as the meta-judge sees judgements (parse.strip_score). Task i is family i % 4 (see
    make_tasks); its score is (i // 4) % 6 and the true judgement is A when (i // 24) is even, so family, score and
    winner are balanced and independent (a winner tied to the score would be a shortcut).
    """
    score = (i // len(FAMILIES)) % 6
    response = degrade(t, score, rng)
    right = grade(t, response).reason
    for _ in range(50):
        wrong = grade(t, degrade(t, rng.choice([s for s in SCORES if s != score]), rng)).reason
        if wrong != right:
            break
    else:
        raise RuntimeError(f"meta-judge seed: no distinct wrong judgement for task {t.id}")
    winner = "A" if (i // (6 * len(FAMILIES))) % 2 == 0 else "B"
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
    validation and judge_eval unchanged, and the iteration prompts last, so their number leaves the SFT data (ift,
    eft, mft) unchanged. No prompt text appears in two splits (nor twice in one).
    """
    out = Path(out_dir)
    seen: set[str] = set()
    end_marks = getattr(world_cfg, "end_marks", "symbols")
    kind_check = getattr(world_cfg, "kind_check", "whole")

    def tasks(split: str, n: int) -> list[Task]:
        return make_tasks(n, random.Random(f"world:{seed}:{split}"), split, exclude=seen, end_marks=end_marks,
                          kind_check=kind_check)

    paths: dict[str, Path] = {}

    def put(name: str, rows: list[dict], sft: bool = True) -> None:
        paths[name] = out / f"{name}.jsonl"
        (write_sft if sft else write_jsonl)(paths[name], rows)

    put("test", _sft_rows(tasks("test", world_cfg.num_test), with_gold=True))
    put("validation", _sft_rows(tasks("validation", world_cfg.num_validation), with_gold=True))

    rng = random.Random(f"world:{seed}:judge_eval:responses")
    rows = []
    for t in tasks("judge_eval", max(1, world_cfg.num_test // 4)):
        for j, s in enumerate(rng.sample(SCORES, rng.choice((2, 3)))):
            rows.append({"id": f"{t.id}-r{j}", "task_id": t.id, "prompt": t.prompt, "response": degrade(t, s, rng),
                         "oracle_score": s, "family": t.family, "meta": t.meta})
    put("judge_eval", rows, sft=False)

    put("ift", _sft_rows(tasks("ift", world_cfg.num_ift), with_gold=True))

    # EFT: task i is family i % 4 and gets score (i // 4) % 6, so (family, score) cells are balanced too.
    rng = random.Random(f"world:{seed}:eft:responses")
    rows = []
    for i, t in enumerate(tasks("eft", world_cfg.num_eft)):
        score = (i // len(FAMILIES)) % 6
        response = degrade(t, score, rng)
        rows.append(make_record(judge_text_fn(t.prompt, response), judgement(t, response), id=t.id,
                                meta={**t.meta, "prompt": t.prompt, "response": response, "oracle_score": score}))
    rng.shuffle(rows)
    put("eft", rows)

    # MFT (meta-judge seed): a tiny model never sees a meta-judge prompt otherwise, and never answers one.
    # Drawn before the iteration prompts, so the SFT data (ift, eft, mft) and so M1 do not move when
    # prompts_per_iteration or the number of iterations does (a sweep over them compares equal M1s); the iteration
    # prompts exclude it, so they move with num_mft, which changes M1 anyway.
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

    for it in iterations:
        put(f"prompts_{it}", _sft_rows(tasks(f"iter{it}", world_cfg.prompts_per_iteration), with_gold=False))
    return paths


def world_texts(n: int, seed: int, end_marks: str = "symbols", kind_check: str = "whole") -> list[str]:
    """Text to train the tokenizer on: n tasks' prompts, gold answers, responses at every level, judgements."""
    rng = random.Random(f"world:{seed}:texts")
    texts = []
    for i, t in enumerate(make_tasks(n, rng, "text", end_marks=end_marks, kind_check=kind_check)):
        response = degrade(t, i % 6, rng)
        texts += [t.prompt, t.gold, response, judgement(t, response)]
    chars = "".join(chr(c) for c in range(33, 127))
    return texts + [" ".join(_OFF_TOPIC), chars]
