"""Writing outputs so that a crash never leaves a half file under the final name, nor a lost one after it.

Every command that writes a model file or directory (convert, quantize, export) writes it as a hidden
``.NAME.partial-PID`` next to the target, then ``commit`` flushes it to disk (``fsync``), renames it into
place and flushes the directory, so the rename itself survives a power cut. A run that was killed leaves
its partial behind; ``remove_stale_partials`` (called when the next run starts) deletes those whose
process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_PARTIAL = re.compile(r"^\..+\.partial-(?P<pid>\d+)$")


@contextmanager
def created_dirs_removed_on_failure(directory: Path) -> Iterator[None]:
    """Run a write into ``directory``; if it fails (an error, Ctrl-C), remove the folders this run created
    on the way to it that are still empty: an interrupted command leaves no empty output folder behind."""
    directory = Path(directory).absolute()
    missing = [folder for folder in (directory, *directory.parents) if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
        raise


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete: ``.NAME.partial-PID`` beside it."""
    return path.parent / f".{path.name}.partial-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(directory: Path) -> list[Path]:
    """Delete the ``.NAME.partial-PID`` files and directories in ``directory`` whose process is gone;
    the ones removed. Partials of running processes (this one included) are left alone."""
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match is None or process_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue  # another run removed it first
        except OSError:
            continue  # not ours to remove after all (permissions): leave it
        removed.append(entry)
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush(path: Path) -> None:
    """Flush a file, or a directory with every file under it, to disk."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            fsync_path(file)
    fsync_path(path)


def commit(partial: Path, target: Path) -> None:
    """Flush ``partial``, rename it to ``target`` (replacing a file there), then flush the directory that
    holds them, so the new name is on disk too."""
    flush(partial)
    os.replace(partial, target)
    fsync_path(target.parent)


__all__ = ["partial_path", "process_alive", "remove_stale_partials", "fsync_path", "flush", "commit"]
