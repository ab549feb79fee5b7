"""Files: jsonl with errors that name file and line, atomic writes, content hashes. Knows no stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block finishes.

    A crash (or SIGKILL) leaves the old file or no file, never a half-written one. Works for files and directories.
    Under torchrun only global rank 0 commits: the other ranks write into a scratch folder that is then deleted.
    """
    path = Path(path)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: only global rank 0 writes (the ranks' results are equal)
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed earlier
        _rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if tmp.is_dir():
            _fsync_tree(tmp)
            if path.exists():
                # A directory cannot be renamed over a non-empty one: move the old one aside first. A crash between
                # the two renames leaves only the backup, which recover() puts back before the next read or write.
                old = _backup(path)
                os.replace(path, old)
                os.replace(tmp, path)
                _rmtree(old)
            else:
                os.replace(tmp, path)
        else:
            _fsync(tmp)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        _rmtree(tmp.parent)


def _backup(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> bool:
    """Finish a directory replace that a crash cut between its two renames: when `path` is missing and its backup
    `.<name>.old` exists, the backup (the last complete version) is put back. True when something was recovered.
    A backup beside an existing `path` is the leftover of a replace that completed: removed."""
    path = Path(path)
    old = _backup(path)
    if not old.exists():
        return False
    if path.exists():
        _rmtree(old)
        return False
    os.replace(old, path)
    return True


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _fsync(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(d: Path) -> None:
    for p in d.rglob("*"):
        if p.is_file():
            _fsync(p)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def dumps_line(obj: Any) -> str:
    # ensure_ascii=False keeps non-ASCII text as written; fixed separators keep bytes stable across runs.
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps_line(row) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[Any]:
    """Every line a JSON value; blank lines skipped; errors name the file and the 1-based line."""
    path = Path(path)
    recover(path.parent)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
    return rows


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    recover(path.parent)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hash(path: str | Path) -> str:
    """sha256 over a file, or over a directory's relative paths and file contents in sorted order."""
    path = Path(path)
    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0" + file_hash(p).encode())
    return h.hexdigest()
