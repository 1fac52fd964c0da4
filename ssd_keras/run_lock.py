"""One job per folder: the lock a trainer takes on its run directory, and an evaluation on
its output folder (docs/EXIT_CODES.md, "Two jobs on one folder").

Two files in the folder:

- ``.lock``: empty, never removed. The holder keeps an ``flock`` on it for its lifetime.
  The kernel releases it when the process ends in any way (exit, crash, SIGKILL), so a
  killed job never blocks the next one on the same machine. ``flock`` also works across
  machines where the file system passes it on (local disks, NFSv4, Lustre with
  ``-o flock``, GPFS).
- ``lock.json``: who holds the folder: ``pid``, ``host``, ``started`` and ``heartbeat``
  (UTC, ISO 8601), ``command``. Written atomically on acquiring and again every
  ``HEARTBEAT_S`` seconds by a daemon thread; removed on release. It names the holder in
  the second job's error, and it is the lock where ``flock`` does not reach another
  machine (some shared file systems accept ``flock`` but keep it local to each client).

When the folder counts as taken (``acquire`` raises ``FolderLockedError``):

- the ``flock`` is held by another process: always (it is alive);
- the ``flock`` was free, and ``lock.json`` names **another host** whose heartbeat is
  younger than ``stale_after`` (``SSD_LOCK_STALE_S``, default 300 s, ten heartbeats):
  that job is alive on a machine whose locks this one cannot see;
- ``flock`` is not supported by the file system (``ENOLCK``, ``EOPNOTSUPP``), and
  ``lock.json`` names this host and a live PID, or another host with a fresh heartbeat.

Anything else is stale and taken over with a warning naming the old holder: a record of
this host whose process is gone (SIGKILL, a crash: its ``flock`` went with it), or of
another host silent for longer than ``stale_after`` (a dead machine, or a job stopped
that long: a SIGSTOPped job on another host loses its lock after ``stale_after``).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from .distributed import seconds_from_env

LOCK_NAME = ".lock"
RECORD_NAME = "lock.json"
HEARTBEAT_S = 30.0
STALE_ENV = "SSD_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FolderLockedError(RuntimeError):
    """Another job holds the folder (a user error: exit 2)."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text) -> _dt.datetime | None:
    try:
        return _dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=_dt.timezone.utc)
    except ValueError:
        return None


def stale_after_from_env() -> float:
    return seconds_from_env(STALE_ENV, DEFAULT_STALE_S, FolderLockedError)


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return isinstance(pid, int)  # alive, another user's
    return True


def read_record(folder: str | Path) -> dict | None:
    """The holder record of ``folder`` (``lock.json``), or None if absent or unreadable."""
    try:
        record = json.loads((Path(folder) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe(record: dict | None) -> str:
    """``PID 123 on host h since 2026-...Z`` (or what is known of it)."""
    if not record:
        return "another process (no lock.json names it)"
    text = f"PID {record.get('pid', '?')} on host {record.get('host', '?')}"
    if record.get("started"):
        text += f" since {record['started']}"
    return text


class FolderLock:
    """The lock of one folder, held from ``acquire()`` to ``release()`` (or the end of the
    process). ``what`` names the folder in messages ("run", "evaluation")."""

    def __init__(self, folder: str | Path, what: str = "run", *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after: float | None = None):
        self.folder = Path(folder)
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.stale_after = stale_after_from_env() if stale_after is None else stale_after
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._fd = None
        self._record = None
        self._stop = threading.Event()
        self._thread = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Take the folder (created if missing) or raise ``FolderLockedError`` at once."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        flock = True
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): the record alone
            flock = False
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise self._taken(read_record(self.folder)) from None
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            flock = False
        try:
            old = read_record(self.folder)
            if old and self._alive_elsewhere(old, flock):
                raise self._taken(old)
            if old and not (old.get("pid") == self.pid and old.get("host") == self.host):
                warnings.warn(f"{self.folder}: taking over the stale lock of {describe(old)} "
                              f"(last heartbeat {old.get('heartbeat', '?')}: that job is gone)",
                              stacklevel=2)
            started = _iso(_now())
            self._record = {"pid": self.pid, "host": self.host, "started": started,
                            "heartbeat": started, "command": " ".join(sys.argv)[:500]}
            self._write()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"{self.what}-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat, remove ``lock.json`` (if still ours) and drop the ``flock``."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            current = read_record(self.folder)
            if current and current.get("pid") == self.pid and current.get("host") == self.host:
                (self.folder / RECORD_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # ------------------------------------------------------------------ internals
    def _alive_elsewhere(self, record: dict, flock: bool) -> bool:
        if record.get("host") == self.host:
            if record.get("pid") == self.pid:
                return False
            # our flock succeeded: whoever wrote it on this machine has ended
            return (not flock) and _pid_alive(record.get("pid"))
        beat = _parse(record.get("heartbeat"))
        if beat is None:
            return False
        return (_now() - beat).total_seconds() < self.stale_after

    def _taken(self, record: dict | None) -> FolderLockedError:
        return FolderLockedError(
            f"{self.what} {self.folder} is in use by {describe(record)}: one job at a time "
            f"per folder; wait for it to end, or use another "
            f"{'run.name' if self.what == 'run' else '--out'}")

    def _write(self) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(self.folder / RECORD_NAME, json.dumps(self._record) + "\n")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._record["heartbeat"] = _iso(_now())
            try:
                self._write()
            except OSError:  # a full disk: the flock still holds; try again next beat
                pass
