"""Judge and meta-judge prompts (the user-turn content only; the caller wraps it in chat turns).

    from harness.judging.templates import judge_text
    judge_text("What is 2+2?", "4", cfg.model.spin)

Two built-in template sets, chosen by `model.spin.judge_template`:
- `paper`: the Self-Rewarding judge prompt (arXiv 2401.10020, Figure 2) verbatim, and the Meta-Rewarding meta-judge
  prompt (arXiv 2407.19594) reconstructed: its opening sentence verbatim, the same five rubric bullets, the prompt,
  the response, the two judgements, and the conclusion instruction `Winner: [Judgement A | Judgement B]`.
- `compact`: a few-token rubric for the tiny models trained from scratch (512-token vocabulary, ~256-token context).
`model.spin.llm_judge_prompt` / `llm_meta_judge_prompt` (Jinja2 text, NeMo-Aligner keys) replace them when set.

Variables: `prompt`, `response` (judge); plus `judgement_a`, `judgement_b` (meta-judge); `low` and `high` (the
score range, e.g. "0" and "5") are also offered to every template. StrictUndefined: a template naming any other
variable fails loudly instead of rendering an empty string into the judge's prompt.
"""

from __future__ import annotations

import functools

import jinja2

# The five rubric bullets of the Self-Rewarding paper, line breaks as in the paper; shared by judge and meta-judge.
RUBRIC = """\
- Add 1 point if the response is relevant and provides some information related to
the user's inquiry, even if it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question,
but does not completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a
useful way, regardless of whether it seems to have been written by an AI Assistant or if it
has elements typically found in blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective,
addressing the user's question directly and comprehensively, and is well-organized and
helpful, even if there is slight room for improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question
by an AI Assistant, without extraneous information, reflecting expert knowledge, and
demonstrating a high-quality, engaging, and insightful answer."""

PAPER_JUDGE = (
    """\
Review the user's question and the corresponding response using the additive 5-point
scoring system described below. Points are accumulated based on the satisfaction of each
criterion:
"""
    + RUBRIC
    + """

<prompt>{{ prompt }}</prompt>
<response>{{ response }}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as
necessary. To evaluate the response in alignment with this additive scoring model, we'll
systematically attribute points based on the outlined criteria."""
)

# Reconstructed (see module docstring): only the opening sentence, the rubric and the Winner format are fixed by the
# reference; the closing bullets follow the paper's meta-judge figure.
PAPER_META_JUDGE = (
    """\
Review the user's question and the corresponding response, along with two judgments. Determine which judgment is \
more accurate according to the rubric provided below. The rubric used for the initial judgments is as follows:
"""
    + RUBRIC
    + """

<prompt>{{ prompt }}</prompt>
<response>{{ response }}</response>
<judgement A>{{ judgement_a }}</judgement A>
<judgement B>{{ judgement_b }}</judgement B>

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why. Consider factors such as
adherence to the rubric, accuracy in evaluating the response, and consistency in applying the criteria.
- Conclude with a clear statement of which judgment is better using the format: \
"Winner: [Judgement A | Judgement B]\""""
)

# Tiny models: every token of template is context the model cannot spend on the answer, so keep these minimal.
COMPACT_JUDGE = "Rate the answer {{ low }}-{{ high }}. End with Score: N.\nQ: {{ prompt }}\nA: {{ response }}"
COMPACT_META_JUDGE = (
    "Which judgement is right? End with Winner: Judgement A or B.\nQ: {{ prompt }}\nA: {{ response }}\n"
    "Judgement A: {{ judgement_a }}\nJudgement B: {{ judgement_b }}"
)

TEMPLATES: dict[str, dict[str, str]] = {
    "paper": {"judge": PAPER_JUDGE, "meta_judge": PAPER_META_JUDGE},
    "compact": {"judge": COMPACT_JUDGE, "meta_judge": COMPACT_META_JUDGE},
}


class TemplateError(ValueError):
    """A judge template that does not parse or names a variable that is not offered."""


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


@functools.lru_cache(maxsize=64)
def _compile(source: str, what: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{what}: not a valid Jinja2 template (line {e.lineno}): {e.message}") from None


def _render(source: str, what: str, variables: dict[str, str]) -> str:
    try:
        return _compile(source, what).render(**variables)
    except jinja2.UndefinedError as e:
        offered = ", ".join(sorted(variables))
        raise TemplateError(f"{what}: {e.message}; the variables offered are: {offered}") from None


VARIABLES = {"judge": ("prompt", "response", "low", "high"),
             "meta_judge": ("prompt", "response", "judgement_a", "judgement_b", "low", "high")}


def check_template(source: str, kind: str, what: str) -> None:
    """Parse a template and check it names only the variables offered to `kind` (judge or meta_judge), so a bad
    llm_judge_prompt fails when the config loads, not after a stage has generated every response."""
    from jinja2 import meta

    try:
        names = meta.find_undeclared_variables(_ENV.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"{what}: not a valid Jinja2 template (line {e.lineno}): {e.message}") from None
    unknown = sorted(names - set(VARIABLES[kind]))
    if unknown:
        raise TemplateError(f"{what}: unknown variable(s) {', '.join(unknown)}; the variables offered are: "
                            f"{', '.join(sorted(VARIABLES[kind]))}")


def _range_vars(spin) -> dict[str, str]:
    return {"low": f"{spin.judge_score_low:g}", "high": f"{spin.judge_score_high:g}"}


def _source(spin, kind: str, override: str | None, key: str) -> tuple[str, str]:
    if override is not None:
        return override, f"model.spin.{key}"
    if spin.judge_template not in TEMPLATES:
        raise TemplateError(f"model.spin.judge_template: one of {', '.join(TEMPLATES)}, got {spin.judge_template!r}")
    return TEMPLATES[spin.judge_template][kind], f"judge template {spin.judge_template!r} ({kind})"


def judge_text(prompt: str, response: str, spin) -> str:
    """The judge's user turn for one (prompt, response); `spin` is config.Spin."""
    source, what = _source(spin, "judge", spin.llm_judge_prompt, "llm_judge_prompt")
    return _render(source, what, {"prompt": prompt, "response": response, **_range_vars(spin)})


def meta_judge_text(prompt: str, response: str, judgement_a: str, judgement_b: str, spin) -> str:
    """The meta-judge's user turn. Pass judgements with their Score lines already stripped (parse.strip_score)."""
    source, what = _source(spin, "meta_judge", spin.llm_meta_judge_prompt, "llm_meta_judge_prompt")
    variables = {"prompt": prompt, "response": response, "judgement_a": judgement_a, "judgement_b": judgement_b}
    return _render(source, what, {**variables, **_range_vars(spin)})
