"""io and NeMo SFT format: byte-identical round trips, malformed lines named, atomic writes survive SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness import config
from harness.data import sft
from harness.io import DataError, atomic_path, read_jsonl, tree_hash, write_jsonl

RECORDS = [
    {"system": "You are terse.", "conversations": [
        {"from": "User", "value": "Trier ces nombres : 3, 1, 2", "label": None},
        {"from": "Assistant", "value": "1, 2, 3", "label": "quality:4"},
        {"from": "User", "value": "和 「逆」? ✓ — ümlaut"},
        {"from": "Assistant", "value": "Ответ: да 🙂"}], "mask": "User", "type": "VALUE_TO_TEXT", "id": "x-1",
     "meta": {"family": "sort", "items": [3, 1, 2]}},
    sft.make_record("What is 2 + 2?", id="p-2"),
]


def test_sft_round_trip_is_byte_identical(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sft.write_sft(a, RECORDS)
    rows = sft.read_sft(a)
    assert rows == RECORDS
    sft.write_sft(b, rows)
    assert a.read_bytes() == b.read_bytes()
    assert "和" in a.read_text(encoding="utf-8")  # kept as written, not \\u-escaped


def test_prompt_turns_gold_and_nemo_rendering():
    rec = RECORDS[0]
    assert sft.gold_response(rec) == "Ответ: да 🙂"
    assert sft.user_text(rec) == "和 「逆」? ✓ — ümlaut"
    text = sft.render_prompt(rec, config.Data())
    assert text == ("<extra_id_0>System\nYou are terse.\n<extra_id_1>User\nTrier ces nombres : 3, 1, 2\n"
                    "<extra_id_1>Assistant\n<extra_id_2>quality:4\n1, 2, 3\n<extra_id_1>User\n和 「逆」? ✓ — ümlaut\n"
                    "<extra_id_1>Assistant\n")
    assert sft.render_prompt(RECORDS[1], config.Data()) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2 + 2?\n<extra_id_1>Assistant\n")


def test_hf_chat_template_rendering():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    data = config.Data(prompt_format="hf_chat_template")
    out = sft.render_prompt(RECORDS[1], data, tokenizer=tok)
    assert out == "<|user|>What is 2 + 2?<|end|><|assistant|>"
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        sft.render_prompt(RECORDS[1], data, tokenizer=tok)


@pytest.mark.parametrize("line,message", [
    ('{"conversations": [{"from": "User", "value": "hi"}]', "malformed JSON"),
    ('{"conversations": []}', "'conversations' must be a non-empty list"),
    ('{"conversations": [{"from": "User"}]}', r"conversations\[0\] needs string 'from' and 'value'"),
    ('{"conversations": [{"from": "Assistant", "value": "x"}]}', "must be from 'User'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_lines_are_reported_with_line_number(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    good = '{"conversations": [{"from": "User", "value": "ok"}]}'
    p.write_text(f"{good}\n\n{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"d.jsonl:4: .*{message}"):
        sft.read_sft(p)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_atomic_write_leaves_old_file_when_block_fails(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"a": 1}])
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("crash")
    assert read_jsonl(p) == [{"a": 1}]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]


def test_atomic_directory_write_replaces_whole_tree(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    h1 = tree_hash(d)
    with atomic_path(d) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("2")
    assert [x.name for x in d.iterdir()] == ["b.txt"] and tree_hash(d) != h1


def test_sigkill_during_write_leaves_no_partial_file(tmp_path):
    out = tmp_path / "big.jsonl"
    script = textwrap.dedent(f"""
        import time
        from harness.io import write_jsonl
        def rows():
            for i in range(10**9):
                if i == 1000:
                    print("writing", flush=True)
                yield {{"i": i, "pad": "x" * 100}}
                if i > 1000:
                    time.sleep(0.001)
        write_jsonl({str(out)!r}, rows())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # neither a half-written final file ...
    leftovers = [p for p in tmp_path.iterdir() if p.name != out.name]
    # ... and the only trace is a hidden temp dir that a later write of the same file cleans up
    assert all(p.name.startswith(".big.jsonl.") for p in leftovers)


def _replace_killed_between_renames(target, tmp_path):
    """A child process replaces directory `target` and is SIGKILLed right after the first rename (old -> backup)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import os, signal
        from harness import io
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if str(dst).endswith(".old"):
                os.kill(os.getpid(), signal.SIGKILL)
        io.os.replace = replace
        with io.atomic_path({str(target)!r}) as tmp:
            tmp.mkdir()
            (tmp / "a.json").write_text('{{"v": 2}}')
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert p.returncode == -9, p.stderr


def test_directory_replace_killed_between_renames_is_recovered_on_read(tmp_path):
    from harness.io import read_json, write_json

    target = tmp_path / "model"
    write_json(target / "a.json", {"v": 1})
    _replace_killed_between_renames(target, tmp_path)
    assert not target.exists() and (tmp_path / ".model.old").is_dir()  # the crash window
    assert read_json(target / "a.json") == {"v": 1}  # the last complete version is back
    assert not (tmp_path / ".model.old").exists()


def test_directory_replace_killed_between_renames_is_recovered_on_write(tmp_path):
    from harness.io import atomic_path, read_json, write_json

    target = tmp_path / "model"
    write_json(target / "a.json", {"v": 1})
    (target / "b.json").write_text("{}")
    _replace_killed_between_renames(target, tmp_path)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.json").write_text('{"v": 3}')
    assert read_json(target / "a.json") == {"v": 3} and not (target / "b.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
