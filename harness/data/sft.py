"""NeMo-Aligner SFT jsonl: {"system", "conversations": [{"from", "value", "label"?}], "mask", "type"}, and rendering.

A prompt record is a conversation whose last turn is the user's (or whose last assistant turn is a gold answer that
self-rewarding ignores). Extra keys (id, meta, ...) are kept as they are, so records round-trip byte-identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.io import DataError, read_jsonl, write_jsonl

USER, ASSISTANT = "User", "Assistant"


def validate_record(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    if "system" in rec and not isinstance(rec["system"], str):
        raise DataError(f"{where}: 'system' must be a string")
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{j}] needs string 'from' and 'value'")
        if turn.get("label") is not None and not isinstance(turn["label"], str):
            raise DataError(f"{where}: conversations[{j}].label must be a string or null")
    if conv[0]["from"] != USER:
        raise DataError(f"{where}: conversations[0] must be from {USER!r}, got {conv[0]['from']!r}")
    return rec


def read_sft(path: str | Path, *, nonempty: bool = False) -> list[dict]:
    """Read and validate; a bad record is reported with file and line; nonempty: no record at all is an error."""
    return read_jsonl(path, validate_record, nonempty=nonempty)


def write_sft(path: str | Path, rows: list[dict]) -> int:
    for k, r in enumerate(rows):
        validate_record(r, f"record {k} for {path}")
    return write_jsonl(path, rows)


def make_record(user: str, assistant: str | None = None, *, system: str = "", **extra: Any) -> dict:
    conv = [{"from": USER, "value": user}]
    if assistant is not None:
        conv.append({"from": ASSISTANT, "value": assistant})
    return {"system": system, "conversations": conv, "mask": USER, "type": "VALUE_TO_TEXT", **extra}


def prompt_turns(rec: dict) -> list[dict]:
    """The turns that form the prompt: everything before the final assistant turn."""
    conv = rec["conversations"]
    return conv[:-1] if conv[-1]["from"] == ASSISTANT and len(conv) > 1 else conv


def gold_response(rec: dict) -> str | None:
    conv = rec["conversations"]
    return conv[-1]["value"] if len(conv) > 1 and conv[-1]["from"] == ASSISTANT else None


def user_text(rec: dict) -> str:
    """The last user turn: what a judge is shown as the question."""
    return [t for t in prompt_turns(rec) if t["from"] == USER][-1]["value"]


def render_nemo(system: str, turns: list[dict], tokens) -> str:
    """NeMo chat format, ending where the assistant's answer starts:
    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{q}\\n<extra_id_1>Assistant\\n
    """
    out = f"{tokens.system_turn_start}System{tokens.end_of_name}{system}{tokens.end_of_turn}"
    for t in turns:
        out += f"{tokens.turn_start}{t['from']}{tokens.end_of_name}"
        if t.get("label"):
            out += f"{tokens.label_start}{t['label']}{tokens.end_of_turn}"
        out += f"{t['value']}{tokens.end_of_turn}"
    return out + f"{tokens.turn_start}{ASSISTANT}{tokens.end_of_name}"


def render_hf(system: str, turns: list[dict], tokenizer) -> str:
    """The tokenizer's own chat template (Llama 3, Qwen, ...), with the generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("model.data.prompt_format=hf_chat_template but the tokenizer has no chat_template")
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user" if t["from"] == USER else "assistant", "content": t["value"]} for t in turns
    ]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def render_prompt(rec_or_turns: dict | list[dict], data_cfg, tokenizer=None, system: str | None = None) -> str:
    """Render a prompt record (or explicit turns) as configured by model.data.prompt_format."""
    if isinstance(rec_or_turns, dict):
        turns, system = prompt_turns(rec_or_turns), rec_or_turns.get("system", "")
    else:
        turns, system = rec_or_turns, system or ""
    if data_cfg.prompt_format == "hf_chat_template":
        return render_hf(system, turns, tokenizer)
    return render_nemo(system, turns, data_cfg.chat_prompt_tokens)
