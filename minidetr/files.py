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
    with atomic_write("runs/x/last.npz") as f:     # a binary file object
        np.savez(f, **arrays)
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _default_file_mode() -> int:
    """The permissions ``open()`` would give a new file (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path, mode="wb", encoding=None):
    """Yield a file object whose contents replace ``path`` only when the block succeeds.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (text, in ``encoding``, default UTF-8). The
    parent folder is created. On any exception (KeyboardInterrupt included) the temporary
    file is removed and ``path`` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {"encoding": encoding or "utf-8"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())    # mkstemp makes 0600; use the usual umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path, obj, indent=2) -> Path:
    """Write ``obj`` as JSON (and a final newline) to ``path`` atomically; return the path."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


__all__ = ["atomic_write", "write_text", "write_json"]
