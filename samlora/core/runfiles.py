"""Run files: every file a command writes or reads back, and the one rule for an existing output directory.

Writes are atomic (a temporary file beside the target, then ``os.replace``: a reader never sees a
half file and a failed write leaves the previous version intact) and the new file gets the
permissions the user's umask gives an ordinary file (0644 under umask 022), not ``mkstemp``'s
0600. A full disk or an unwritable folder becomes one :class:`errors.UserError` line, and so does
a run file that is missing or unreadable when it is read back (:func:`read_json`).

The output-directory rule, the same for every command (:class:`OutputDir`):

* a missing or empty directory is taken;
* a directory that holds files needs ``--overwrite`` (``train`` also takes ``--resume``);
* ``--overwrite`` removes only the files an earlier run of the same command recorded in the
  directory's manifest (``.samlora_outputs.json``, updated with every file written), so files
  the user put there are never touched;
* a directory that is an input of the command (data, a training run) is refused.

A directory that several processes write at once (the workers of one ``parameter_search``)
is claimed with ``shared=True``: its manifest is then read, merged and rewritten under an
exclusive ``fcntl`` lock on ``.samlora_outputs.lock`` (:class:`DirectoryLock`, which the
workers also hold while they choose their next piece of work), so no worker's record is lost.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from samlora.core import logfiles
from samlora.core.errors import UserError, write_error

log = logging.getLogger(__name__)

SCHEMA = "schema"  # the key of a record's layout version (readers also take records without one)
MANIFEST = ".samlora_outputs.json"
MANIFEST_SCHEMA = 1
LOCK_FILE = ".samlora_outputs.lock"
_ACTIVE: list["OutputDir"] = []  # directories claimed by the running command(s), outermost first


# --------------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------------
def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """Permissions of a new ordinary file under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False, rerun: str = "rerun the command") -> Iterator[Path]:
    """A temporary file (or, with ``folder``, an empty folder) beside ``path``, renamed to ``path``
    when the block ends without error: for writers that need a path or write over a long time
    (a label stack streamed section by section, a Zarr store).

    On any failure the temporary is removed and an existing ``path`` is left as it was; a full
    disk or an unwritable folder is a :class:`UserError` saying what to do (``rerun``). The result
    gets the permissions the umask gives, and is recorded in the manifest of every claimed output
    directory that holds it (a folder as one entry). A folder replaces an earlier one.
    """
    path = Path(path)
    existed, tmp = path.exists(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what the umask gives a folder
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)  # reopened by name: some writers (tifffile) need the file object's name
            tmp = Path(name)
        yield tmp
        if not folder:
            os.chmod(tmp, file_mode())
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            _remove_path(tmp)
        error = write_error(path, exc, existed, rerun)
        if error is not None:
            raise error from None
        raise
    _record(path)


def _remove_path(path: Path) -> None:
    """Remove a file or a folder tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True,
                 rerun: str = "rerun the command") -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``
    (:func:`atomic_path`: never half a file, the previous version intact on failure)."""
    with atomic_path(path, rerun=rerun) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as fh:
            write(fh)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """An ``HxWx3`` uint8 RGB (or ``HxW`` gray) image as a PNG, atomically."""
    array = image[..., ::-1] if image.ndim == 3 else image  # OpenCV encodes BGR
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    return write_bytes(path, encoded.tobytes())


def write_json(path: str | os.PathLike, data: Any, sort_keys: bool = True) -> Path:
    """``data`` as indented JSON (paths written as strings), atomically. Keys are sorted unless
    their order means something (``sort_keys=False``: e.g. models in table order)."""
    return write_text(path, json.dumps(data, indent=1, sort_keys=sort_keys, default=_json_default) + "\n")


def plain_record(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (options, a config) as a record for a JSON file: paths become strings."""
    return {key: _json_default(value) if isinstance(value, os.PathLike) else value for key, value in values.items()}


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object that a command wrote; a missing or unreadable file, or one that holds no
    object, is a UserError naming ``what`` it should be (e.g. "a finished training run")."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {path.parent} {what}?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(record, dict):
        raise UserError(f"{path} does not hold a JSON object; is {path.parent} {what}?")
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV text through the csv module (fields with commas or quotes are quoted).

    Floats are written exactly (Python's shortest round-trip form), None is an empty field,
    keys not in ``columns`` are left out and missing keys are empty.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Rows as a CSV file (see :func:`csv_text`), atomically."""
    return write_text(path, csv_text(rows, columns))


def torch_save(obj: Any, path: str | os.PathLike, rerun: str = "rerun with --resume") -> Path:
    """``torch.save`` atomically."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh), rerun=rerun)


# --------------------------------------------------------------------------------------------
# Output directories
# --------------------------------------------------------------------------------------------
class DirectoryLock:
    """An exclusive lock on ``folder/.samlora_outputs.lock``, shared by the processes that write
    into one output directory (on one machine or several, over a file system with POSIX locks:
    a local disk, NFS, Lustre, GPFS). The kernel drops it when its process dies.

    It uses POSIX record locks (``fcntl.lockf``) rather than filelock's ``flock``: the workers
    may run on several machines, and record locks are the ones NFS shares between clients (through
    its lock manager, on every NFS version) and Lustre and GPFS support alike.

    Re-entrant within a process (a nested holder shares the outer one's lock: closing a second
    descriptor of the file would drop a POSIX lock); :meth:`release` is idempotent, so a holder
    may hand the lock back early and still leave a ``with`` block safely.
    """

    _held: dict[str, list[int]] = {}  # lock file -> [descriptor, holders] in this process

    def __init__(self, folder: str | os.PathLike) -> None:
        self.file = str(Path(folder).resolve() / LOCK_FILE)
        self._mine = False

    def acquire(self) -> "DirectoryLock":
        """Wait for the lock (no-op if this holder has it)."""
        if self._mine:
            return self
        entry = self._held.get(self.file)
        if entry is None:
            import fcntl  # POSIX only; imported here so that other commands run anywhere

            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
            except BaseException as exc:
                os.close(fd)
                if isinstance(exc, OSError):
                    raise UserError(f"cannot lock {self.file} ({exc.strerror}): the workers of a search need a "
                                    "file system with POSIX locks for --output_dir (a local disk, NFS, Lustre, "
                                    "GPFS)") from None
                raise
            entry = self._held[self.file] = [fd, 0]
        entry[1] += 1
        self._mine = True
        return self

    def release(self) -> None:
        """Give the lock back (no-op if this holder does not have it)."""
        if not self._mine:
            return
        self._mine = False
        entry = self._held[self.file]
        entry[1] -= 1
        if entry[1] == 0:
            import fcntl

            del self._held[self.file]
            fcntl.lockf(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class OutputDir:
    """An output directory claimed by one command, with the manifest of the files it wrote.

    ``shared``: several processes write into it at once (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike, command: str, shared: bool = False) -> None:
        self.path = Path(path)
        self.command = command
        self.shared = shared

    def lock(self) -> DirectoryLock | contextlib.nullcontext:
        """The directory's lock for a shared directory (created with it), else a no-op."""
        if not self.shared:
            return contextlib.nullcontext()
        self.path.mkdir(parents=True, exist_ok=True)
        return DirectoryLock(self.path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def _manifest(self) -> dict[str, Any]:
        try:
            record = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def owner(self) -> str | None:
        """The command whose manifest the directory holds (None: no manifest)."""
        command = self._manifest().get("command")
        return str(command) if command else None

    def recorded(self) -> list[str]:
        """The relative paths an earlier run of this command recorded (empty if none)."""
        record = self._manifest()
        if record.get("command") != self.command:
            return []
        return [str(f) for f in record.get("files", [])]

    def user_files(self) -> list[str]:
        """Entries of the directory that no earlier run of this command recorded."""
        if not self.path.is_dir():
            return []
        ours = {f.split("/", 1)[0] for f in self.recorded()} | {MANIFEST, LOCK_FILE}
        return sorted(p.name for p in self.path.iterdir() if p.name not in ours)

    def check(self, overwrite: bool, resume: bool = False, protected: Iterable[Path] = (),
              flag: str = "--output_dir") -> None:
        """Refuse a directory this command may not write into; changes nothing."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{flag} {self.path} exists and is not a directory; choose another path")
        resolved = self.path.resolve()
        for other in protected:
            other = Path(other).resolve()
            if resolved == other or other in resolved.parents or resolved in other.parents:
                raise UserError(f"{flag} {self.path} overlaps {other}, which is an input of this command; "
                                "choose a directory of its own (nothing was written)")
        owner = self.owner()
        if owner not in (None, self.command):
            raise UserError(f"{flag} {self.path} holds the outputs of `{owner}`; `{self.command}` writes into a "
                            "directory of its own: choose another one (nothing was written)")
        entries = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE) if self.path.is_dir() else []
        if resume or overwrite or not entries:
            return
        if self.recorded():
            raise UserError(f"{flag} {self.path} holds an earlier `{self.command}` run: pass --overwrite to "
                            "replace it, or choose another directory (nothing was written)")
        found = ", ".join(entries[:4])
        raise UserError(f"{flag} {self.path} exists and is not empty ({found}): choose a new directory or pass "
                        "--overwrite (only files this command writes are replaced; nothing was written)")

    def claim(self, overwrite: bool, resume: bool = False, protected: Iterable[Path] = (),
              flag: str = "--output_dir", keep: Iterable[str] = ()) -> "OutputDir":
        """Check, create, clear an earlier run's files (``overwrite``; the recorded names in
        ``keep`` stay: a database the command clears itself, open while it claims) and start recording."""
        self.check(overwrite, resume, protected, flag)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = write_error(self.path, exc, False, "rerun the command")
            if error is None:
                raise
            raise error from None
        with self.lock():
            files = self.recorded()
            if overwrite and not resume:
                self._remove([f for f in files if f not in keep])
                files = [f for f in files if f in keep]
                others = self.user_files()
                if others:
                    log.warning("--overwrite: %s also holds %s, which stay (files with this command's names are "
                                "replaced)", self.path, ", ".join(others[:4]))
            self._files = list(files)
            self._write_manifest()
        if self not in _ACTIVE:
            _ACTIVE.append(self)
        return self

    def release(self) -> None:
        """Stop recording (the command is over)."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    @contextlib.contextmanager
    def active(self, log_name: str | None = None, extra_loggers: Sequence[str] = (),
               replay: Sequence[logging.LogRecord] = ()) -> Iterator["OutputDir"]:
        """Record writes (and copy the log to ``log_name``, after the ``replay`` records) while
        the block runs."""
        if self not in _ACTIVE:
            _ACTIVE.append(self)
        try:
            if log_name is None:
                yield self
            else:
                with logfiles.log_to_file(self.path / log_name, extra_loggers, replay) as path:
                    _record(path)
                    yield self
        finally:
            self.release()

    def add_tree(self, folder: Path) -> None:
        """Record every file under ``folder`` (written by a library that does not use runfiles)."""
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                self.add(path)

    def add(self, path: Path) -> None:
        """Record ``path`` (inside the directory) in the manifest; a folder is one entry, ``name/``,
        that stands for everything in it."""
        relative = path.resolve().relative_to(self.path.resolve()).as_posix() + ("/" if path.is_dir() else "")
        if relative in (MANIFEST, LOCK_FILE):
            return
        if not self.shared:
            self._record(relative)
            return
        with self.lock():  # other workers record files too: the manifest on disk is the record
            self._files = self.recorded()
            self._record(relative)

    def _record(self, relative: str) -> None:
        inside = any(f.endswith("/") and relative.startswith(f) for f in self._files)
        if relative not in self._files and not inside:
            self._files.append(relative)
            self._write_manifest()

    def discard(self, path: Path) -> None:
        """Remove ``path`` (a file or folder this command wrote) and its manifest entry."""
        _remove_path(path)
        relative = path.resolve().relative_to(self.path.resolve()).as_posix()
        kept = [f for f in self._files if f != relative and not f.startswith(relative + "/")]
        if kept != self._files:
            self._files = kept
            self._write_manifest()

    def _write_manifest(self) -> None:
        record = {SCHEMA: MANIFEST_SCHEMA, "command": self.command, "files": self._files,
                  "note": "files written by this command; --overwrite removes these and only these"}
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(self.manifest_path, lambda fh: fh.write(text), binary=False)

    def _remove(self, files: Sequence[str]) -> None:
        root = self.path.resolve()
        removed = 0
        for name in files:
            path = (self.path / name).resolve()
            if root in path.parents and (path.is_file() or (name.endswith("/") and path.is_dir())):
                _remove_path(path)
                removed += 1
        for name in sorted({str(Path(f).parent) for f in files}, key=len, reverse=True):
            folder = self.path / name
            while folder.resolve() != root and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        if removed:
            log.warning("--overwrite: removed %d files of the earlier `%s` run in %s", removed, self.command,
                        self.path)


def _record(path: Path) -> None:
    """Add ``path`` to the manifest of every claimed output directory that holds it (a nested
    directory's manifest counts as a file of the outer one)."""
    resolved = path.resolve()
    for out in list(_ACTIVE):
        if out.path.resolve() in resolved.parents and resolved != out.manifest_path.resolve():
            out.add(resolved)
