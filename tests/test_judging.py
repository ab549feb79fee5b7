"""Judge prompts, score/verdict parsers and k-sample aggregation, against hand-worked cases."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import Spin
from harness.judging.aggregate import aggregate
from harness.judging.parse import DEFAULT_SCORE_REGEX, parse_score, parse_winner, strip_score
from harness.judging.templates import TemplateError, judge_text, meta_judge_text

# ------------------------------------------------------------------------------------------------ parse_score
SCORE_CASES = [
    ("Score: 4", 4.0),
    ("score: 4.5", 4.5),
    ("SCORE: 5", 5.0),
    ("Points:3", 3.0),
    ("points: 0", 0.0),
    ("**Score:** 4", 4.0),
    ("**Score**: 2", 2.0),
    ("__Score:__ 1", 1.0),
    ("Score: **3**", 3.0),
    ("Score : 3", 3.0),
    ("Score:  4", 4.0),
    ("Score: 4/5", 4.0),
    ("Score: 4.", 4.0),
    ('Conclude: "Score: 2"', 2.0),
    ("The answer is relevant.\nScore: 3\n", 3.0),
    # out of range or not a number -> None
    ("Score: 6", None),
    ("Score: 8/10", None),
    ("Score: -1", None),
    ("Score: 1e400", None),
    ("Score: " + "9" * 400, None),
    ("Score: five", None),
    ("Score:", None),
    ("I would give it a 4.", None),
    ("", None),
    # several matches: the last one is the verdict (module docstring)
    ("Points: 1 for relevance.\nPoints: 1 for coverage.\nScore: 4", 4.0),
    ("Score: 2\nOn reflection, Score: 3", 3.0),
    ("Score: 4\nScore: 9", None),  # the verdict is out of range; no fallback to the earlier 4
]


@pytest.mark.parametrize("text,expected", SCORE_CASES)
def test_parse_score_hand_cases(text, expected):
    assert parse_score(text, 0, 5) == expected


def test_parse_score_respects_range_and_custom_regex():
    assert parse_score("Score: 7", 0, 10) == 7.0
    assert parse_score("Score: 0", 1, 5) is None
    assert parse_score("Rating = 3", 0, 5, regex=r"Rating = {{ reward }}") == 3.0
    assert parse_score("Rating = 3", 0, 5, regex="Rating ={{reward}}") == 3.0  # placeholder spacing is free


def test_bad_reward_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="reward"):
        parse_score("Score: 3", 0, 5, regex="Score: ")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        parse_score("Score: 3", 0, 5, regex="Score: ({{ reward }}")


# ------------------------------------------------------------------------------------------------ parse_winner
WINNER_CASES = [
    ("Winner: Judgement A", "A"),
    ("Winner: Judgement A.", "A"),
    ("winner: judgment b", "B"),
    ("**Winner:** Judgement A", "A"),
    ("Winner: **Judgement B**", "B"),
    ("WINNER: JUDGEMENT B", "B"),
    ("Judgement A misses a point.\nWinner: Judgement B", "B"),
    ("Winner: Judgement A\nActually, Winner: Judgement B", "B"),  # last one counts
    ("Winner: Judgement C", None),
    ("Winner: Judgement Alpha", None),
    ("Winner: [Judgement A | Judgement B]", None),  # an echo of the instruction is no verdict
    ("Judgement A is better.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", WINNER_CASES)
def test_parse_winner_hand_cases(text, expected):
    assert parse_winner(text) == expected


# ------------------------------------------------------------------------------------------------ strip_score
def test_strip_score_removes_score_lines_only():
    text = "Relevant and direct, 3/4 parts covered.\n**Score:** 4/5\nWell organised."
    assert strip_score(text) == "Relevant and direct, 3/4 parts covered.\nWell organised."
    assert strip_score("Good answer. Score: 4") == "Good answer."
    assert strip_score("No score here.") == "No score here."
    assert strip_score("Points: 1 for relevance\nScore: 1") == "for relevance"
    assert strip_score("Good\nScore:\n4\nOk") == "Good\nOk"  # a match spanning lines
    assert strip_score("Sco" + "Score: 1" + "re: 2") == ""  # a cut that joins text into a new score is cut too


# ------------------------------------------------------------------------------------------------ never raises
@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise(text):
    score = parse_score(text, 0, 5)
    assert score is None or 0 <= score <= 5
    assert parse_winner(text) in (None, "A", "B")
    assert isinstance(strip_score(text), str)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="Score:Pint*_ 0123456789./-\nWinerJudgmABe", max_size=80))
def test_parsers_never_raise_on_near_misses(text):
    score = parse_score(text, 0, 5)
    assert score is None or 0 <= score <= 5
    assert parse_winner(text) in (None, "A", "B")
    assert parse_score(strip_score(text), 0, 5) is None  # nothing score-like survives stripping


# ------------------------------------------------------------------------------------------------ templates
RUBRIC_LINES = [
    "Review the user's question and the corresponding response using the additive 5-point",
    "- Add 1 point if the response is relevant and provides some information related to",
    "- Add another point if the response addresses a substantial portion of the user's question,",
    "- Award a third point if the response answers the basic elements of the user's question in a",
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,",
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question",
    "demonstrating a high-quality, engaging, and insightful answer.",
    '- Conclude with the score using the format: "Score: <total points>"',
    "systematically attribute points based on the outlined criteria.",
]


def test_paper_judge_template_is_verbatim_and_filled():
    text = judge_text("What is 2+2?", "It is 4.", Spin())
    lines = text.split("\n")
    for line in RUBRIC_LINES:
        assert line in lines
    assert "<prompt>What is 2+2?</prompt>\n<response>It is 4.</response>" in text
    assert "{{" not in text
    assert text.endswith("systematically attribute points based on the outlined criteria.")


def test_paper_meta_judge_template():
    text = meta_judge_text("Q?", "R.", "Judge one.", "Judge two.", Spin())
    assert text.startswith(
        "Review the user's question and the corresponding response, along with two judgments. Determine which "
        "judgment is more accurate according to the rubric provided below. The rubric used for the initial "
        "judgments is as follows:\n"
    )
    for line in RUBRIC_LINES[1:7]:
        assert line in text.split("\n")
    order = [text.index(s) for s in ("<prompt>Q?</prompt>", "<response>R.</response>",
                                     "<judgement A>Judge one.</judgement A>", "<judgement B>Judge two.</judgement B>")]
    assert order == sorted(order)
    assert text.rstrip().endswith('"Winner: [Judgement A | Judgement B]"')
    assert parse_winner(text) is None  # the instruction itself is not a verdict


def test_compact_templates_are_short():
    spin = dataclasses.replace(Spin(), judge_template="compact")
    assert judge_text("2+2?", "4", spin) == "Rate the answer 0-5. End with Score: N.\nQ: 2+2?\nA: 4"
    meta = meta_judge_text("2+2?", "4", "right", "wrong", spin)
    assert "Judgement A: right\nJudgement B: wrong" in meta
    assert len(meta) < 160


def test_llm_prompt_overrides_are_honoured():
    spin = dataclasses.replace(Spin(), llm_judge_prompt="J[{{ prompt }}|{{ response }}]",
                               llm_meta_judge_prompt="M[{{ judgement_a }}|{{ judgement_b }}]")
    assert judge_text("p", "r", spin) == "J[p|r]"
    assert meta_judge_text("p", "r", "a", "b", spin) == "M[a|b]"


def test_values_are_not_escaped_or_reinterpreted():
    text = judge_text("<b>{{ x }} & 'y'</b>", "r", dataclasses.replace(Spin(), judge_template="compact"))
    assert "Q: <b>{{ x }} & 'y'</b>" in text


def test_missing_variable_is_a_clear_error():
    spin = dataclasses.replace(Spin(), llm_judge_prompt="Judge {{ prompt }} and {{ answer }}")
    with pytest.raises(TemplateError, match=r"llm_judge_prompt: 'answer' is undefined.*prompt, response"):
        judge_text("p", "r", spin)
    spin = dataclasses.replace(Spin(), llm_judge_prompt="Judge {{ prompt ")
    with pytest.raises(TemplateError, match="not a valid Jinja2 template"):
        judge_text("p", "r", spin)


# ------------------------------------------------------------------------------------------------ aggregate
def test_aggregate_hand_example():
    # valid: 4, 2, 3 -> mean 3, population variance (1 + 1 + 0) / 3; failed: no score, out of range
    out = aggregate(["ok. Score: 4", "meh. Score: 2", "I cannot judge.", "Score: 9", "fine **Score:** 3"], 0, 5)
    assert [j["score"] for j in out["judgements"]] == [4.0, 2.0, None, None, 3.0]
    assert out["judgements"][0]["text"] == "ok. Score: 4"
    assert out["mean"] == pytest.approx(3.0)
    assert out["var"] == pytest.approx(2 / 3)
    assert (out["num_valid"], out["num_failed"]) == (3, 2)


def test_aggregate_edge_cases():
    none = aggregate(["nothing", "still nothing"], 0, 5, DEFAULT_SCORE_REGEX)
    assert (none["mean"], none["var"], none["num_valid"], none["num_failed"]) == (None, None, 0, 2)
    one = aggregate(["Score: 5"], 0, 5)
    assert (one["mean"], one["var"], one["num_valid"], one["num_failed"]) == (5.0, 0.0, 1, 0)
