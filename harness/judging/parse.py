"""Parse judge scores and meta-judge verdicts out of free text. Never raises on any text.

    parse_score("Relevant and direct.\\n**Score:** 4", 0, 5)   # -> 4.0
    parse_winner("... Winner: Judgement B.")                    # -> "B"

The configured regexes (model.spin.judge_reward_regex, meta_judge_reward_regex) contain a `{{ reward }}`
placeholder, replaced here by a capture group: a number (`-?[0-9]+(\\.[0-9]+)?`, so "4/5" reads 4 and "4.5" reads
4.5) for scores, exactly A or B (not followed by a letter or digit) for verdicts. The rest of the regex is made
tolerant of markdown: every literal space may be any run of whitespace, `*` or `_` (also none: "Points:3"), and a
literal colon may be preceded by spaces, `*` or `_` ("**Score**: 4", "Score : 4"). So "**Score:** 4", "score: 4.5",
"Points:3", "**Winner:** Judgement A" and "winner: judgment b" all parse with the default regexes. (The rewrite
assumes a non-verbose regex; quantified spaces or colons are left as written.)

Which match counts: the LAST one. The paper's prompt asks the judge to justify first and to *conclude* with
"Score: <total points>", so the final match is the verdict, and a justification that talks about points on the way
("Points: 1 for relevance, ...") must not override it. NeMo-Aligner takes the first match, which reads such a
running tally as the score. We do not return None when several score lines disagree: that would throw away exactly
those judgements that tally points before concluding, which the prompt invites. The last match is taken as is: if
it is out of range the result is None (no fallback to an earlier number, which would not be the verdict). The same
rule applies to Winner lines, for the same reason (the meta-judge prompt also asks to conclude with the verdict).
"""

from __future__ import annotations

import functools
import math
import re

DEFAULT_SCORE_REGEX = "(?i)(?:Score|Points): {{ reward }}"
DEFAULT_WINNER_REGEX = "(?i)Winner: (?:Judgement|Judgment) {{ reward }}"

_PLACEHOLDER = re.compile(r"\{\{\s*reward\s*\}\}")
_SCORE_GROUP = r"(-?[0-9]+(?:\.[0-9]+)?)(?![eE][+-]?[0-9])"  # "1e400" is not "1"
_WINNER_GROUP = r"([AB])(?![A-Za-z0-9])"
_MARKUP = r"[\s*_]*"  # what may stand where the regex has a literal space
_QUANTIFIERS = "*+?{"


def _tolerant(fragment: str) -> str:
    """Rewrite literal spaces and colons (outside classes, escapes and group syntax) to tolerate markdown."""
    out, i, in_class = [], 0, False
    while i < len(fragment):
        ch = fragment[i]
        nxt = fragment[i + 1] if i + 1 < len(fragment) else ""
        quantified = nxt != "" and nxt in _QUANTIFIERS
        if ch == "\\":  # an escape: copy it and the escaped character untouched
            out.append(fragment[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
            out.append(ch)
        elif ch == "[":
            in_class = True
            out.append(ch)
            if nxt == "]":  # "[]...]" : a leading ] is a literal inside the class
                out.append(nxt)
                i += 1
        elif ch == "(" and nxt == "?":  # group syntax like (?: (?i) (?P<n> (?<= : copy up to its end marker
            j = i + 2
            while j < len(fragment) and fragment[j] not in ":)>=!":
                j += 1
            out.append(fragment[i : j + 1])
            i = j + 1
            continue
        elif ch == " " and not quantified:
            out.append(_MARKUP)
        elif ch == ":" and not quantified:
            out.append(r"[ \t*_]*:")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=32)
def compile_reward_regex(regex: str, group: str) -> re.Pattern:
    """The configured regex with `{{ reward }}` replaced by `group`; a ValueError names a bad regex."""
    parts = _PLACEHOLDER.split(regex)
    if len(parts) != 2:
        raise ValueError(f"reward regex {regex!r}: must contain '{{{{ reward }}}}' exactly once")
    # Flags like (?i) must stay at the very start, so only the text around the placeholder is rewritten.
    pattern = _tolerant(parts[0].rstrip(" ")) + _MARKUP + group + _tolerant(parts[1])
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"reward regex {regex!r}: not a valid regular expression: {e}") from None


def _last_match(pattern: re.Pattern, text) -> re.Match | None:
    if not isinstance(text, str):
        return None
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last


def parse_score(text: str, low: float, high: float, regex: str = DEFAULT_SCORE_REGEX) -> float | None:
    """The judge's score: the last match, or None if none, not finite, or outside [low, high]."""
    m = _last_match(compile_reward_regex(regex, _SCORE_GROUP), text)
    if m is None:
        return None
    try:
        score = float(m.group(1))
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(score) or not low <= score <= high:
        return None
    return score


def parse_winner(text: str, regex: str = DEFAULT_WINNER_REGEX) -> str | None:
    """The meta-judge's verdict, "A" or "B" (the last Winner line), or None when there is none."""
    m = _last_match(compile_reward_regex(regex, _WINNER_GROUP), text)
    return m.group(1).upper() if m else None


_DENOMINATOR = r"(?:[\s*_]*/[\s*_]*[0-9]+(?:\.[0-9]+)?)?"  # the "/5" of "Score: 4/5"
_LEFTOVER = " \t*_\"'.:-"  # what may remain of a score line once the score is cut out


def strip_score(text: str, regex: str = DEFAULT_SCORE_REGEX) -> str:
    """Remove every score from a judgement (a meta-judge must not just compare the numbers).

    Each match and a trailing "/5" are cut; a line left with nothing but markup is dropped. Repeated until no match
    is left, since a cut can join text into a new match ("Sco" + "Score: 1" + "re: 2").
    """
    if not isinstance(text, str):
        return ""
    pattern = compile_reward_regex(regex, _SCORE_GROUP + _DENOMINATOR)
    text = text.replace("\x00", "").strip()
    while True:  # each pass that finds a match makes the text shorter, so this ends
        out = []
        for line in pattern.sub("\x00", text).split("\n"):  # a match may span lines; \x00 marks where it was
            if "\x00" not in line:
                out.append(line)
            elif line.replace("\x00", "").strip(_LEFTOVER):
                out.append(line.replace("\x00", "").rstrip())
        cleaned = "\n".join(out).strip()
        if cleaned == text:
            return cleaned
        text = cleaned
