"""LLM-as-a-judge: prompts (templates), score and verdict parsers (parse), k-sample aggregation (aggregate),
and the Meta-Rewarding meta-judge: response selection, battles, Bradley-Terry Elo, the score quota (meta)."""

from harness.judging.aggregate import aggregate
from harness.judging.meta import (
    ScoreQuota,
    battle_outcome,
    elo_scores,
    judgement_pairs,
    select_judge_pair,
    select_response_for_meta,
)
from harness.judging.parse import parse_score, parse_winner, strip_score
from harness.judging.templates import TemplateError, judge_text, meta_judge_text

__all__ = [
    "ScoreQuota",
    "TemplateError",
    "aggregate",
    "battle_outcome",
    "elo_scores",
    "judge_text",
    "judgement_pairs",
    "meta_judge_text",
    "parse_score",
    "parse_winner",
    "select_judge_pair",
    "select_response_for_meta",
    "strip_score",
]
