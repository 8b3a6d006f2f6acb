"""A run's output folder: writable, held by one run at a time, cleared only of our own files.

Every recipe writes into one ``--output_dir``. Three rules keep a user's files safe there:

* **One run per folder.** :func:`lock_output` takes an exclusive advisory lock
  (``.adaptlab.lock``, ``flock``) before the run reads the folder's state and holds it until the
  process ends; a second run into the same folder is refused in one sentence that names the
  holder (pid, host, start time) instead of silently mixing its files with the first's.
* **Overwrite removes only what the recipe writes.** A :class:`Layout` lists a recipe's marker
  files (proof that the folder holds its output) and the entries it writes; :func:`clear_owned`
  deletes those and nothing else, and refuses a non-empty folder that holds none of the markers
  (``--output_dir .`` never wipes a repository).
* **Bad paths fail first.** :func:`check_writable` refuses a path that is a file or lies in a
  folder this user cannot write, before any heavy work.

A folder the lock created is removed again when the run fails before writing anything into
it, so a refused run leaves the file system as it found it.

Example::

    >>> from pathlib import Path
    >>> layout = Layout("demo", markers=("result.json",), owned=("result.json", "figures"))
    >>> layout.owns(Path("figures"))
    True
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adaptlab.errors import UserError, on_user_error
from adaptlab.io import ASIDE_SUFFIX, TEMP_SUFFIX, sweep_temporaries

LOCK_FILE = ".adaptlab.lock"
_HELD: dict[str, RunLock] = {}  # locks this process holds, by lock file


class OutputDirError(UserError):
    """An output folder that cannot be used: a file, not writable, busy, or someone else's."""


@dataclass(frozen=True)
class Layout:
    """What a recipe writes into its output folder.

    Attributes:
        recipe: the recipe's name, for messages (``"extraction"``, ``"fine-tuning"``...).
        markers: relative paths (or glob patterns) of files only this recipe writes; a folder
            holding any of them holds this recipe's output.
        owned: glob patterns of the top-level entries the recipe writes; temporary and
            moved-aside versions of them (``.{name}.adaptlab-tmp``...) count as owned too.
    """

    recipe: str
    markers: tuple[str, ...]
    owned: tuple[str, ...]

    def owns(self, relative: Path) -> bool:
        """Whether the top-level entry ``relative`` is one this recipe writes."""
        name = relative.parts[0]
        candidates = [name]
        for suffix in (TEMP_SUFFIX, ASIDE_SUFFIX):
            if name.startswith(".") and name.endswith(suffix):
                stem = name[1 : -len(suffix)]  # a folder's ".{name}", a file's ".{name}.{random}"
                candidates = [stem, stem.rsplit(".", 1)[0]]
        return any(fnmatch.fnmatch(c, p) for c in candidates for p in self.owned)

    def holds_output(self, out: Path) -> bool:
        """Whether ``out`` holds any of this recipe's marker files."""
        return any(next(out.glob(marker), None) is not None for marker in self.markers)


def check_writable(out: str | Path, flag: str = "--output_dir") -> Path:
    """Refuse an output path that is a file or cannot be created or written by this user.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        OutputDirError: with one sentence naming the path and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{flag} {out} is a file; pass a folder path.")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"{flag} {out} lies under {probe}, a file; pass a folder path.")
    # Try it rather than ask os.access: root passes every permission check, yet cannot write
    # to a read-only mount or a pseudo file system.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".adaptlab-probe-", dir=probe))
    except OSError:
        raise OutputDirError(
            f"{flag} {out} cannot be written ({probe} is not writable by this user); pass a "
            "folder you can write to."
        ) from None
    return out


class RunLock:
    """An exclusive lock on an output folder for the lifetime of a run (``flock``).

    The lock file records the holder (pid, host, start time) for the message another run gets.
    On release it is deleted while still locked, and a run that locked a file somebody else had
    just deleted notices (the inode changed) and tries again, so two runs never both hold it.
    A run holds it until it releases it or its process ends; a later run in the same process
    (a notebook cell, a test) takes it over.
    """

    def __init__(self, out: str | Path, recipe: str) -> None:
        self.out = Path(out)
        self.recipe = recipe
        self.path = self.out / LOCK_FILE
        self.created: list[Path] = []  # folders this lock created, deepest last
        self._fd: int | None = None
        self._key = ""

    def acquire(self) -> RunLock:
        """Take the lock, creating the folder if needed.

        Raises:
            OutputDirError: another process holds it.
        """
        self._key = os.path.abspath(self.path)
        if self._key in _HELD:  # an earlier run in this process (a notebook, a test) is over
            _HELD[self._key].release()
        missing = []
        probe = self.out
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self.created = missing[::-1]
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                self._undo_created()
                raise OutputDirError(
                    f"{self.out} is in use by another {self.recipe} run ({holder}); wait for it "
                    "to finish or pass another --output_dir."
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                _HELD[self._key] = self
                _write_holder(fd)
                atexit.register(self.release)
                return self
            os.close(fd)  # the holder deleted the file we opened: lock the new one
        raise OutputDirError(f"Could not lock {self.out}; another run keeps replacing its lock.")

    def release(self) -> None:
        """Drop the lock and its file; remove folders the lock created if they stayed empty."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        if _HELD.get(self._key) is self:
            del _HELD[self._key]
        atexit.unregister(self.release)
        self._undo_created()

    def _undo_created(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the run wrote something, which stays
        self.created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def release_all() -> None:
    """Release every lock this process holds (a run ended by an error; see ``errors``), the
    deepest folder first, so a recipe run in-process inside another's folder (the demo's, the
    study's) leaves the outer folder empty enough to be removed when its lock made it."""
    release_locks_since(set())


on_user_error(release_all)  # a run refused with one sentence leaves no lock behind


def _write_holder(fd: int) -> None:
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "holder unknown"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}"


def held_locks() -> set[str]:
    """The lock files this process holds now (absolute paths)."""
    return set(_HELD)


def release_locks_since(before: set[str]) -> None:
    """Release the locks taken since :func:`held_locks` returned ``before``, the deepest folder
    first, as the end of the process that took them would (a recipe run in-process)."""
    for key in sorted(set(_HELD) - before, key=len, reverse=True):
        _HELD[key].release()


def lock_output(
    out: str | Path,
    recipe: str,
    is_main: bool = True,
    agree: Callable[[str | None], list[str | None]] | None = None,
) -> RunLock | None:
    """Check ``out`` is writable and lock it for this run (the main process of a launch).

    Args:
        out: the output folder.
        recipe: the recipe's name, for messages.
        is_main: whether this process takes the lock (rank 0 of a multi-process run).
        agree: gathers one value from every process (``all_gather_object``); when given, the
            main process's refusal is raised on every process, so none waits at a barrier.

    Returns:
        The held lock on the main process, ``None`` elsewhere.

    Raises:
        OutputDirError: the path is unusable or another run holds it.
    """
    lock, error = None, None
    if is_main:
        try:
            check_writable(out)
            lock = RunLock(out, recipe).acquire()
        except OutputDirError as err:
            error = str(err)
    if agree is not None:
        error = next((e for e in agree(error) if e), None)
    if error:
        if lock is not None:
            lock.release()
        raise OutputDirError(error)
    return lock


def is_empty(out: str | Path) -> bool:
    """Whether ``out`` is missing or holds nothing but a run lock."""
    out = Path(out)
    return not out.is_dir() or all(p.name == LOCK_FILE for p in out.iterdir())


def check_ours(out: str | Path, layout: Layout) -> None:
    """Refuse a non-empty folder that holds none of ``layout``'s markers (someone else's).

    Raises:
        OutputDirError: with one sentence saying why and what to do.
    """
    out = Path(out)
    if not is_empty(out) and not layout.holds_output(out):
        markers = " or ".join(m.replace("*-*/", "{K}-{seed}/") for m in layout.markers)
        raise OutputDirError(
            f"--output_dir {out} holds files that are not {layout.recipe} output (none of "
            f"{markers}); this recipe writes or removes only its own files there, so pass an "
            "empty or new folder."
        )


def clear_owned(out: str | Path, layout: Layout) -> list[Path]:
    """Delete the entries of ``out`` that ``layout``'s recipe writes; keep everything else.

    Call it with the folder locked. Temporary leftovers of killed writes are swept too.

    Returns:
        The removed top-level entries.

    Raises:
        OutputDirError: ``out`` is not empty but holds none of the recipe's markers.
    """
    out = Path(out)
    if not out.is_dir():
        return []
    check_ours(out, layout)
    removed = []
    for path in out.iterdir():
        if layout.owns(path.relative_to(out)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    sweep_temporaries(out)
    return removed
