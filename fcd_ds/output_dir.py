"""The output folder: what a run may write there, the manifest of what it did write, and the lock that
keeps a second run out while one is running.

Layout of ``OUTPUT_DIR``::

    fcd_ds_manifest.json  the names below that a fcd_ds run created here (its own, and nothing else)
    .fcd_ds.lock          held (``flock``) by global rank 0 for the life of a run; names the holder
    checkpoints/          DeepSpeed save_checkpoint folders (global_step{N}/, latest) + per-rank states
    student/              the distilled student (``model/`` for launchers/finetune_teacher.py)
    runs/                 TensorBoard events (--report_to tensorboard)
    wandb/                offline Weights & Biases runs and the run id a resume continues (--report_to wandb)
    train_log.jsonl       one JSON line per logged step
    metrics.json          final metrics
    run_config.json       resolved arguments and DeepSpeed JSON of the run

Removal follows the manifest only: ``--overwrite_output_dir`` removes the entries an earlier run
recorded as its own, never a file or folder by name alone, and never through a symlink; a name the run
would write that exists but is not in the manifest (a user's ``model/``, a folder of another tool, a
symlink) is refused before any work. Anything else a user keeps there is never touched.

The lock is an advisory ``fcntl.flock`` on ``.fcd_ds.lock`` (released by the kernel when the holding
process dies, however it dies; as ``filelock``'s UnixFileLock). Every rank probes it at plan time, and
global rank 0 takes it once the process group is up (every rank has planned by then).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .errors import UsageError

__all__ = ["MANIFEST", "LOCK_FILE", "RUN_FILES", "run_entries", "read_manifest", "has_run", "foreign_entries", "claim",
           "clear_run_files", "lock_holder", "OutputLock", "check_free_space", "write_atomic"]

MANIFEST = "fcd_ds_manifest.json"
LOCK_FILE = ".fcd_ds.lock"
RUN_FILES = ("checkpoints", "runs", "wandb", "train_log.jsonl", "metrics.json", "run_config.json")  # besides the export folder


def run_entries(export_name: str) -> tuple[str, ...]:
    """The top-level names a run of a launcher writes: :data:`RUN_FILES` and its export folder (``student`` or ``model``)."""
    return (*RUN_FILES, export_name)


def read_manifest(output_dir: str | Path) -> list[str]:
    """The entries ``fcd_ds_manifest.json`` records as written by fcd_ds ([] without one).

    Raises:
        UsageError: the file is not a manifest fcd_ds wrote (not JSON, or an entry that is not a plain
            top-level name).
    """
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        ok = isinstance(entries, list) and all(isinstance(e, str) and e and "/" not in e and e not in (".", "..", MANIFEST, LOCK_FILE)
                                               for e in entries)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UsageError(f"--output_dir: {path} is not a manifest fcd_ds wrote; remove it by hand, or pick another --output_dir")
    return entries


def has_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds an entry a fcd_ds run recorded in its manifest."""
    out = Path(output_dir)
    return any(os.path.lexists(out / name) for name in read_manifest(out))


def foreign_entries(output_dir: str | Path, names) -> list[str]:
    """Those of ``names`` that exist in ``output_dir`` but are not fcd_ds's own: not in the manifest, or a symlink."""
    out = Path(output_dir)
    own = set(read_manifest(out))
    return [n for n in names if os.path.lexists(out / n) and (n not in own or (out / n).is_symlink())]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path.tmp`` and rename it over ``path`` (a reader sees the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def claim(output_dir: str | Path, names) -> None:
    """Record ``names`` in the manifest as this run's (before it creates them). Rank 0 only."""
    from . import __version__

    out = Path(output_dir)
    entries = sorted(set(read_manifest(out)) | set(names))
    write_atomic(out / MANIFEST, json.dumps({"written_by": f"fcd_ds {__version__}", "entries": entries}, indent=2))


def clear_run_files(output_dir: str | Path) -> None:
    """Remove the entries the manifest records (``--overwrite_output_dir``); nothing else is touched, and
    a symlink is never followed (:func:`foreign_entries` refused it at plan time; it is refused again here).

    Raises:
        UsageError: a recorded entry has become a symlink.
    """
    out = Path(output_dir)
    entries = read_manifest(out)
    for name in entries:
        path = out / name
        if path.is_symlink():
            raise UsageError(f"--overwrite_output_dir: {path} is a symlink, which fcd_ds never writes; remove it by hand")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if entries:
        write_atomic(out / MANIFEST, json.dumps({"entries": []}))


def _describe(holder: str) -> str:
    try:
        h = json.loads(holder)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"]))
        return f"pid {h['pid']} on {h['host']}, started {started}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no description"


def lock_holder(output_dir: str | Path) -> str | None:
    """Who holds ``output_dir``'s run lock (pid, host, start time, command line), or None when nobody does.
    Takes and drops a shared lock, so it never blocks and never keeps the folder."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except OSError:  # a file system without flock (Lustre mounted without -o flock): nothing to learn
        return None
    finally:
        os.close(fd)  # drops the probe's lock too
    return None


class OutputLock:
    """The exclusive run lock of an output folder, held by this process until :meth:`release` or exit.

    Raises (from :meth:`acquire`):
        UsageError: another run holds it (names that run), or the folder cannot be written (read-only,
            permission denied).
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []  # what acquire() created (the folders, the lock file), innermost last
        self.previous = b""

    def acquire(self) -> "OutputLock":
        out = self.path.parent
        try:
            missing = [p for p in (out, *out.parents) if not p.exists()]
            out.mkdir(parents=True, exist_ok=True)
            self.created = missing[::-1] + ([] if self.path.exists() else [self.path])
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"--output_dir: cannot write {out} ({exc.strerror}); pick a writable --output_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise UsageError(f"--output_dir: {out} is in use by a running fcd_ds run ({holder}); wait for it to end, "
                             "or pick another --output_dir") from None
        except OSError as exc:  # e.g. Lustre without -o flock: run unlocked, and say so
            print(f"warning: --output_dir: {out}'s file system cannot lock files ({exc.strerror}); "
                  "nothing keeps a second run out of it", file=sys.stderr, flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        try:
            self.previous = os.pread(fd, 1 << 16, 0)  # an earlier run's description, put back by discard()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"--output_dir: cannot write {self.path} ({exc.strerror}); free space or pick another --output_dir") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Release, and remove what :meth:`acquire` created (the lock file, then the folders if still
        empty), or put back the lock file's earlier content: a run that stopped on bad input before
        writing anything leaves the folder as it found it."""
        if self.fd is not None and self.path not in self.created:
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, self.previous, 0)
            except OSError:
                pass
        for path in reversed(self.created):
            try:
                path.unlink() if path == self.path else path.rmdir()
            except OSError:
                break  # a folder someone has written into since: kept, with what is above it
        self.release()


def check_free_space(output_dir: str | Path, need_bytes: int, what: str) -> None:
    """Refuse to start when ``output_dir``'s file system has less than ``need_bytes`` free.

    Raises:
        UsageError: names the free and the needed GiB and what the estimate is made of (``what``).
    """
    free = shutil.disk_usage(output_dir).free
    if free < need_bytes:
        raise UsageError(f"--output_dir: {output_dir} has {free / 2**30:.3g} GiB free, {what} need about {need_bytes / 2**30:.3g} GiB; "
                         "free space, or pick another --output_dir")
