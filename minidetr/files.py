"""Writing files so that nothing already on disk is lost: every write is atomic.

A file is written to a temporary file in the same folder, flushed to the disk, and then
renamed over its destination (``os.replace``, atomic on POSIX and Windows). A crash, a
Ctrl-C or a full disk in the middle of a write therefore leaves the previous version of
the file intact and no half-written file behind: a reader sees the old contents or the
new ones, never a mixture. Checkpoints, ``run.json``, ``metrics.jsonl``, COCO subsets and
benchmark results are all written through :func:`atomic_write`.

::

    write_json("runs/x/run.json", {"epochs": 50})
    write_text("runs/x/metrics.jsonl", "".join(json.dumps(r) + "\\n" for r in records))
    with atomic_write("runs/x/last.npz", what="checkpoint", size_hint=nbytes) as f:
        np.savez(f, **arrays)
    keep_previous("runs/x/last.npz", "runs/x/last.prev.npz")   # before the next save

When the disk refuses a write (no space left, a read-only file system, no permission),
the temporary file is removed and :class:`DiskWriteError` says in one sentence which
file was being written, why it failed, and what to do (with ``size_hint``: how much
space the file needs).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

# errno values that mean "the disk (or the folder) refuses this write"
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
READ_ONLY = (errno.EROFS,)
NO_PERMISSION = (errno.EACCES, errno.EPERM)
WRITE_ERRORS = NO_SPACE + READ_ONLY + NO_PERMISSION + (errno.EIO,)


class DiskWriteError(OSError):
    """A file could not be written: no space, a read-only folder, no permission.

    ``str(error)`` is one sentence naming the file, what it is, the reason and a hint;
    ``errno``, ``path`` and ``what`` are attributes.
    """

    def __init__(self, message, *, errno_code=None, path=None, what="file"):
        super().__init__(message)
        self.errno = errno_code
        self.path = None if path is None else Path(path)
        self.what = what

    def __str__(self):
        return self.args[0]


def format_size(nbytes) -> str:
    """``1536000`` -> ``"1.5 MB"`` (decimal units, as ``df -H`` shows them)."""
    size = float(nbytes)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def disk_write_error(error: OSError, path, what="file", size_hint=None) -> DiskWriteError:
    """The :class:`DiskWriteError` that explains ``error`` (an OSError of a write to ``path``)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    code = error.errno
    if code in NO_SPACE:
        need = (f"the {what} needs about {format_size(size_hint)}; " if size_hint else "")
        reason = (f"no space left on the device of {folder} ({need}free some space there, "
                  f"e.g. old checkpoints, or write to another folder)")
    elif code in READ_ONLY:
        reason = f"{folder} is on a read-only file system (write to another folder)"
    elif code in NO_PERMISSION:
        reason = (f"permission denied: this user may not write in {folder} (change its "
                  f"permissions or write to another folder)")
    else:
        reason = f"{error.strerror or error} (errno {code})"
    return DiskWriteError(f"cannot write the {what} {path}: {reason}", errno_code=code,
                          path=path, what=what)


def _is_write_error(error) -> bool:
    return (isinstance(error, OSError) and not isinstance(error, DiskWriteError)
            and error.errno in WRITE_ERRORS)


def make_folder(path, what="folder") -> Path:
    """``mkdir -p path``; a refusal (read-only, permission) raises :class:`DiskWriteError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if _is_write_error(e):
            raise disk_write_error(e, path, what) from None      # its parent refused
        raise
    return path


def _default_file_mode() -> int:
    """The permissions ``open()`` would give a new file (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def atomic_write(path, mode="wb", encoding=None, *, what="file", size_hint=None):
    """Yield a file object whose contents replace ``path`` only when the block succeeds.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, in ``encoding``, default UTF-8). The
    parent folder is created. On any exception (KeyboardInterrupt included) the temporary
    file is removed and ``path`` is left as it was. A write the disk refuses (no space,
    read-only, no permission) raises :class:`DiskWriteError` naming ``what`` (e.g.
    ``"checkpoint"``) and ``path``; ``size_hint`` (bytes) goes into its advice.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        kwargs = {"encoding": encoding or "utf-8"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())    # mkstemp makes 0600; use the usual umask
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            _remove_quietly(tmp)
        if _is_write_error(e):
            raise disk_write_error(e, path, what, size_hint) from None
        raise


def keep_previous(path, previous, what="file") -> bool:
    """Make ``previous`` hold what ``path`` holds now (atomically); False if no ``path``.

    Called before ``path`` is rewritten, it keeps the version before the next one
    (``last.npz`` -> ``last.prev.npz``). A hard link costs no space and no time; a file
    system without hard links gets a copy. ``path`` itself is never touched, so at every
    moment both names hold a complete file.
    """
    path, previous = Path(path), Path(previous)
    if not path.is_file():
        return False
    if previous.is_file() and os.path.samefile(path, previous):
        return True                           # already the same file (a hard link)
    link = previous.with_name(f".{previous.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(path, link)
        os.replace(link, previous)
        _remove_quietly(link)    # rename() between two links of one file does nothing
    except OSError as e:
        _remove_quietly(link)
        if _is_write_error(e) and e.errno not in NO_PERMISSION:
            raise disk_write_error(e, previous, what, path.stat().st_size) from None
        # no hard links here (FAT, some network file systems): copy instead
        with atomic_write(previous, what=what, size_hint=path.stat().st_size) as f, \
                open(path, "rb") as src:
            shutil.copyfileobj(src, f)
    return True


def write_text(path, text: str, what="file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_write(path, "w", what=what, size_hint=len(text.encode("utf-8"))) as f:
        f.write(text)
    return Path(path)


def write_json(path, obj, indent=2, what="file") -> Path:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; return the path."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n", what=what)


__all__ = ["atomic_write", "write_text", "write_json", "keep_previous", "make_folder",
           "DiskWriteError", "disk_write_error", "format_size"]
