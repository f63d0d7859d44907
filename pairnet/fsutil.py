"""Writes that never leave a torn or half-written file, and folder locks.

Every file pairnet writes (pair files, CSVs, meta.json, pid files, checkpoints) goes to
a unique temporary file in the destination's folder first and is then renamed over the
destination with ``os.replace``, which is atomic on one file system: a reader sees the
old file or the new one, never a mix, and a crash leaves at most a ``.tmp`` file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from pairnet.errors import PairnetError
from pairnet.paths import folder_key, state_dir


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


LOCK_SUFFIX = ".lock"
_HELD: dict[str, int] = {}  # lock files this process holds, with a nesting count


class FolderBusy(PairnetError):
    """Another pairnet process holds the folder's lock."""


@contextlib.contextmanager
def file_lock(path: str | Path, busy: str, wait_s: float = 0.0, note: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing), with ``filelock``
    (``flock`` on POSIX, ``msvcrt`` locking on Windows).

    ``wait_s``: how long to wait for another holder; then :class:`FolderBusy` with the
    one-line message ``busy``. ``note`` is written into the file for whoever looks. The
    kernel releases the lock when the holder exits, however it exits (SIGKILL included).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:  # this process holds it already (a pipeline making its data): re-entrant
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = FileLock(key)
    try:
        lock.acquire(timeout=wait_s, poll_interval=0.2)
    except Timeout:
        raise FolderBusy(busy) from None
    try:
        with open(path, "r+") as fh:  # the lock file itself: who holds it, for whoever looks
            fh.truncate()
            fh.write(f"{os.getpid()} {note}\n")
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        lock.release()


def folder_lock(folder: str | Path, what: str, wait_s: float = 0.0) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on ``folder``: a lock file in pairnet's state folder
    (``<state>/locks/``, keyed by the folder's resolved path), never inside the folder itself,
    which may be a user's data.

    ``wait_s``: how long to wait for another holder; then :class:`FolderBusy` names the
    folder and what the caller wanted to do.
    """
    folder = Path(folder)
    return file_lock(lock_path(folder), wait_s=wait_s, note=f"{folder.resolve()}: {what}",
                     busy=f"{folder} is in use by another pairnet process (data being made or a pipeline step "
                          f"running); cannot {what} now — wait for it to finish")


def lock_path(folder: str | Path) -> Path:
    """The lock file that guards ``folder``."""
    return state_dir() / "locks" / f"{folder_key(folder)}{LOCK_SUFFIX}"


# Files pairnet wrote for a person (`--out` of preview and predict), by absolute path: the
# command that wrote it and the bytes' digest. A later run of the same command may replace
# its own earlier output; any other existing file needs --force.
OUTPUTS = "outputs.json"
OUTPUTS_KEPT = 2000  # the newest entries; an older output needs --force once


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_json(name: str) -> dict:
    """A JSON object pairnet keeps in its state folder; {} when missing, unreadable or not an object."""
    try:
        found = json.loads((state_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _outputs() -> dict:
    return read_state_json(OUTPUTS)


def check_overwrite(out: str | Path, command: str, force: bool) -> Path:
    """``out``, unless it is an existing file that ``command`` did not write there (as it is
    now, byte for byte): then one line naming it and the way out, ``--force``."""
    out = Path(out)
    if force or not out.exists():
        return out
    entry = _outputs().get(str(out.resolve()))
    if out.is_file() and isinstance(entry, dict) and entry.get("by") == command and entry.get("sha256") == _digest(out):
        return out
    raise PairnetError(f"--out {out} exists and is not an earlier output of `pairnet {command}`; refusing to "
                       "overwrite it (--force replaces it)")


def record_output(out: str | Path, command: str) -> None:
    """Remember ``out`` as ``command``'s output, so that its next run may replace it."""
    out = Path(out)
    record = state_dir() / OUTPUTS
    with file_lock(record.with_name(OUTPUTS + LOCK_SUFFIX), f"{record} is busy", wait_s=30):
        table = _outputs()
        table.pop(str(out.resolve()), None)  # re-inserted last: the newest entries are kept
        table[str(out.resolve())] = {"by": command, "sha256": _digest(out)}
        write_text(record, json.dumps(dict(list(table.items())[-OUTPUTS_KEPT:]), indent=1))
