"""A run directory's files: rewritten atomically, appended to and checked without ever following a link.

A file is rewritten by writing a temporary file beside it (`.tmp-<name>-<pid>`), fsyncing it and renaming it
over the old one: a kill at any moment leaves the old file or the new one, whole (the temporary file of a dead
process is removed by checkpoint.clean_tmp at the next start). The rename replaces a symbolic link instead of
writing through it, appends open with O_NOFOLLOW, and `refuse_links` stops a run whose files are links before
anything is read or written: a link in a run directory could point at any file of the user's.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LisaError
from ..schema import os_reason

TMP_PREFIX = ".tmp-"  # every temporary file or directory in a run; checkpoint.clean_tmp removes dead ones
# What lisatune writes in a run directory (run_dir.MARKER is ".lisatune-run"); gsm_samples_step*.json too.
RUN_FILES = (".lisatune-run", "config.yaml", "metrics.jsonl", "summary.json", "wandb-run-id", "tb", "checkpoints",
             "final")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` by `data` atomically (temp file in the same directory, fsync, os.replace); one line on error."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)  # a leftover of this pid; O_EXCL below never opens a planted link
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic on POSIX; a link at `path` is replaced, never written through
        fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LisaError(f"cannot write {path} ({os_reason(e)})") from None
    except BaseException:  # an exception or Ctrl-C mid-write: the old file stays, the temp file goes
        tmp.unlink(missing_ok=True)
        raise


def open_append(path: str | os.PathLike):
    """`path` opened for appending text (created if absent), never through a symbolic link."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if path.is_symlink():  # O_NOFOLLOW's ELOOP
            raise LisaError(f"{path} is a symbolic link: lisatune never writes a run's files through a link "
                            "(replace it by the file itself)") from None
        raise LisaError(f"cannot write {path} ({os_reason(e)})") from None
    return os.fdopen(fd, "a", encoding="utf-8")


def refuse_links(run: Path) -> None:
    """Before a run directory is resumed or reported: none of lisatune's files in it (nor a checkpoint) is a
    symbolic link, so nothing outside the run is read as the run's or written through."""
    if not run.is_dir():
        return
    names = [run / n for n in RUN_FILES] + sorted(run.glob("gsm_samples_step*.json"))
    if (run / "checkpoints").is_dir() and not (run / "checkpoints").is_symlink():
        names += sorted((run / "checkpoints").iterdir())
    for p in names:
        if p.is_symlink():
            raise LisaError(f"{p} is a symbolic link (to {os.readlink(p)}): lisatune never reads or writes a run's "
                            "files through a link (replace it by the file itself, or use another output_dir)")
