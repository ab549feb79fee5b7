"""Files: jsonl with errors that name file and line, atomic writes, content hashes. Knows no stage."""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


# (roots, pending {target: staged temporary}) of the stage_outputs block in progress, if any
_STAGE: contextvars.ContextVar[tuple[list[str], dict[Path, Path]] | None] = contextvars.ContextVar("stage", default=None)


@contextlib.contextmanager
def stage_outputs(*roots: str | Path) -> Iterator[None]:
    """Atomic writes under `roots` made in the block replace their targets together when it finishes; if it fails,
    none does. So a stage that fails at any step, after some outputs were written, leaves every old output as it was.

    A staged output is only visible at `pending(path)` until the block ends.
    """
    dirs = [os.path.abspath(r) for r in roots]
    for d in {p for r in dirs for p in (r, os.path.dirname(r))} if not _other_rank() else ():
        for stale in Path(d).glob(".staged.*"):  # left by a stage killed before its commit
            _rmtree(stale)
    pending: dict[Path, Path] = {}
    token = _STAGE.set((dirs, pending))
    try:
        yield
    except BaseException:
        for tmp in pending.values():
            _rmtree(tmp.parent)
        raise
    finally:
        _STAGE.reset(token)
    for path, tmp in pending.items():
        if _other_rank():
            _rmtree(tmp.parent)
            continue
        with atomic_path(path) as dst:  # the usual replace, now outside the stage
            os.replace(tmp, dst)
        _rmtree(tmp.parent)


def _other_rank() -> bool:
    return int(os.environ.get("RANK", "0")) != 0


def pending(path: str | Path) -> Path:
    """Where an output written earlier in the running stage_outputs block is until the block commits; else `path`."""
    stage = _STAGE.get()
    return stage[1].get(Path(os.path.abspath(path)), Path(path)) if stage else Path(path)


def _staged(path: Path) -> dict[Path, Path] | None:
    stage = _STAGE.get()
    if stage is None:
        return None
    a = os.path.abspath(path)
    return stage[1] if any(a == r or a.startswith(r + os.sep) for r in stage[0]) else None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block finishes.

    A crash (or SIGKILL) leaves the old file or no file, never a half-written one. Works for files and directories.
    Under torchrun only global rank 0 commits: the other ranks write into a scratch folder that is then deleted.
    """
    path = Path(path)
    staged = _staged(path)
    if staged is not None:  # an output of the running stage: kept aside until stage_outputs commits it
        # (other torchrun ranks keep theirs in a scratch folder, so pending() works there too, and never commit)
        if not _other_rank():
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staged.", dir=None if _other_rank() else path.parent)) / path.name
        try:
            yield tmp
        except BaseException:
            _rmtree(tmp.parent)
            raise
        old = staged.pop(Path(os.path.abspath(path)), None)
        if old is not None:
            _rmtree(old.parent)
        staged[Path(os.path.abspath(path))] = tmp
        return
    if _other_rank():  # torchrun: only global rank 0 writes (the ranks' results are equal)
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
    if not path.name:  # "." or "/" (the parent of a relative file name): never replaced by atomic_path
        return False
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


def finite(obj: Any) -> Any:
    """obj with every NaN or infinite float replaced by None: strict JSON has no NaN (json.dumps writes a bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _dumps(obj: Any, **kw) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except ValueError:  # a NaN somewhere: rare, so the common case pays nothing for the walk
        return json.dumps(finite(obj), ensure_ascii=False, allow_nan=False, **kw)


def dumps_line(obj: Any) -> str:
    # ensure_ascii=False keeps non-ASCII text as written; fixed separators keep bytes stable across runs.
    return _dumps(obj, separators=(", ", ": "))


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps_line(row) + "\n")
            n += 1
    return n


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing file or a byte that is not UTF-8 is a DataError naming the file (and line)."""
    path = Path(path)
    recover(path.parent)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {data[e.start:e.start + 1]!r} at offset {e.start})"
                        ) from None


def read_jsonl(path: str | Path, schema: Any = None, *, nonempty: bool = False) -> list[Any]:
    """Every line a JSON value; blank lines skipped; errors name the file and the 1-based line.

    schema: every row must match it (see check_row), or a function (row, "file:line") that raises DataError;
    nonempty: a file with no row is an error.
    """
    path = Path(path)
    rows = []
    for i, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: JSON text may hold a raw U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        if callable(schema) and not isinstance(schema, type):
            schema(row, f"{path}:{i}")
        elif schema is not None:
            check_row(row, schema, f"{path}:{i}")
        rows.append(row)
    if nonempty and not rows:
        raise DataError(f"{path}: no rows (the file is empty or blank)")
    return rows


def check_row(value: Any, schema: Any, where: str, key: str = "") -> None:
    """value against schema: a dict {key: schema} (keys required; extra keys allowed), a one-element list [schema]
    (a list of such), a type or a tuple of types (None for null; int is accepted for float, bool never for a number),
    or Any. Errors name the file:line and the key, e.g. `responses.jsonl:3: responses[0].is_end: missing`."""
    if schema is Any:
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise DataError(f"{where}: {key or 'row'}: expected an object, got {_kind(value)}")
        for k, sub in schema.items():
            if k not in value:
                raise DataError(f"{where}: {key + '.' if key else ''}{k}: missing")
            check_row(value[k], sub, where, f"{key + '.' if key else ''}{k}")
        return
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise DataError(f"{where}: {key}: expected a list, got {_kind(value)}")
        for j, v in enumerate(value):
            check_row(v, schema[0], where, f"{key}[{j}]")
        return
    types_ = schema if isinstance(schema, tuple) else (schema,)
    ok = any(value is None if t is None else
             isinstance(value, (int, float)) and not isinstance(value, bool) if t is float else
             isinstance(value, int) and not isinstance(value, bool) if t is int else isinstance(value, t)
             for t in types_)
    if not ok:
        names = " or ".join("null" if t is None else t.__name__ for t in types_)
        raise DataError(f"{where}: {key}: expected {names}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, _dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
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


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes and threads (each call opens its own file description)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
