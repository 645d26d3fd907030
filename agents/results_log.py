"""The resumable results log of an evaluation and the lock on its output folder.

``OUT/results.jsonl`` holds one JSON line per (item id, mode), appended, flushed and synced as each answer
comes (:class:`ResultsLog`); ``--resume`` skips the pairs already there. ``OUT/run.json`` records what the
run is (target, attributor, data, drawing); resuming with another is refused (:func:`check_run_file`).
One run writes to ``OUT`` at a time: it holds an OS lock on ``OUT/eval.lock`` (:func:`lock_output`) that
dies with its process, so a killed run can be resumed.

Example:
    >>> with lock_output("eval-out"):  # doctest: +SKIP
    ...     log = ResultsLog(Path("eval-out") / RESULTS_FILE)
    ...     done = {(r["id"], r["mode"]) for r in log.load()}
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from api_tool.errors import EvalOutputError, EvalOutputLockedError

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = "eval.lock"
"""The file in ``OUT`` that a running evaluation holds an OS lock on (it names the holder)."""
_LOCK_RECORD_BYTES = 512
"""The holder's details are padded with spaces to this size, so a shorter record overwrites a longer one."""
_WINDOWS_LOCK_OFFSET = 1 << 30
"""Where the lock byte lies on Windows: past the holder's details, which other processes must still read."""
RUN_IDENTITY = ("target", "attributor", "data", "style", "gray_level", "system_prompt", "rounds")
"""The keys of ``run.json`` a resumed run must share with the run it continues."""


class ResultsLog:
    """``results.jsonl``: read what is done, append new answers durably.

    A last line cut short by a crash is dropped on load (its answer is asked again); any other bad line
    is an error naming its line number.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def load(self) -> list[dict[str, Any]]:
        """Read the file (if any); returns the records, the latest answer per (id, mode) kept.

        Every record is written as one complete line ending in a newline, so a file that does not end in
        one was cut short while writing its last line: that line is removed (its answer is asked again).
        """
        if not self.path.exists():
            self.records = []
            return self.records
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            complete = raw.rfind(b"\n") + 1
            print(f"eval: removing the incomplete last line of {self.path}", file=sys.stderr)
            with self.path.open("r+b") as handle:
                handle.truncate(complete)
            raw = raw[:complete]
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        # Split on "\n" only: an answer may hold U+2028 or U+0085, which json.dumps leaves unescaped.
        for number, data in enumerate(raw.split(b"\n")[:-1], start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError:
                raise EvalOutputError(f"{self.path}:{number}: not UTF-8; fix or remove that line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalOutputError(
                    f"{self.path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove it"
                ) from None
            if not isinstance(record, dict) or "id" not in record or "mode" not in record:
                raise EvalOutputError(f"{self.path}:{number}: not a result record (needs 'id' and 'mode')")
            latest[(str(record["id"]), str(record["mode"]))] = record
        self.records = list(latest.values())
        return self.records

    @property
    def done(self) -> set[tuple[str, str]]:
        """The (item id, mode) pairs already answered."""
        return {(str(r["id"]), str(r["mode"])) for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and make it durable before returning."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.records.append(record)


# ----------------------------------------------------------------------------------------------
# One writer per output folder.
# ----------------------------------------------------------------------------------------------


def _try_lock(fd: int) -> bool:
    """Take the exclusive OS lock on ``fd`` without waiting; ``False`` when another open file holds it.

    POSIX: ``flock`` on the whole file (per open file description, so even a second open in the same
    process is refused). Windows: ``msvcrt.locking`` on one byte at :data:`_WINDOWS_LOCK_OFFSET`. Either
    lock goes away with its process, however it ends.
    """
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    """Release the lock :func:`_try_lock` took (on POSIX closing ``fd`` releases it as well)."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_holder(fd: int) -> str:
    """Who holds the lock, as the lock file records it ("pid P on HOST, started TIME")."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
        return "its pid is not recorded yet"


@contextmanager
def lock_output(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock on an output folder for the block: one writer per ``results.jsonl``.

    The lock is an OS lock on ``folder/eval.lock`` (see :func:`_try_lock`), so it vanishes with its process
    even when that is killed: a lock file left behind blocks nothing, and kill-then-``--resume`` works.
    While held, the file records the holder's pid, host and start time (UTC) for the refusal message.
    The file is left in place afterwards (removing it could let two writers lock two different files).

    Raises ``EvalOutputLockedError`` at once, naming the holder, when another run holds the folder.

    Example:
        >>> with lock_output("eval-out"):  # doctest: +SKIP
        ...     ...  # write eval-out/results.jsonl
    """
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise EvalOutputLockedError(
                f"{Path(folder)} is being written by another eval run ({_lock_holder(fd)}); wait for it to "
                "finish or stop it (then rerun with --resume), or choose another --out"
            )
        try:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, holder.ljust(_LOCK_RECORD_BYTES).encode("utf-8"))
            yield path
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def check_run_file(path: Path, identity: dict[str, Any], resume: bool, has_results: bool) -> None:
    """Refuse to write over earlier results without ``resume``, and to resume a run that differs in a
    :data:`RUN_IDENTITY` key from ``path`` (``run.json``)."""
    if has_results and not resume:
        raise EvalOutputError(
            f"{path.parent} already holds results; pass --resume to continue that run or choose another --out"
        )
    if resume and path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        differing = [key for key in RUN_IDENTITY if previous.get(key) != identity.get(key)]
        if differing:
            details = "; ".join(f"{key}: {previous.get(key)!r} then, {identity.get(key)!r} now" for key in differing)
            raise EvalOutputError(f"cannot resume {path.parent}: the run differs ({details})")
