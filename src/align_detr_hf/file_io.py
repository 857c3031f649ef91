"""Atomic file and folder writes that never delete what they did not create.

- [`atomic_write_bytes`] / [`atomic_write_text`] / [`atomic_file`]: write a temporary sibling, fsync it, rename it
  over the target. A crash leaves either the old file or the new one, never half of one.
- [`atomic_directory`]: build a folder in a staging sibling and swap it in by renames when the block succeeds. A
  non-empty folder that `is_replaceable` does not recognise (e.g. not a previous conversion) is refused unless
  `overwrite=True`; on failure the staging folder is removed and the old folder is untouched.

Every error that is the user's to fix (a path that is a file, a read-only folder, a folder we may not replace) is an
`OutputPathError` (a `ValueError`) with a one-line message naming the path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "OutputPathError",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_folder",
]


class OutputPathError(ValueError):
    """An output path we cannot or may not write; the message names it and says why."""


def _fsync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_directory(Path(folder))


def check_output_folder(folder: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Create `folder` (and parents) if needed; raise `OutputPathError` if it is a file or not writable.
    With `create=False` only check that it could be created and written (nothing is made on disk)."""
    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise OutputPathError(f"{what} {folder}: {part} is a file, not a folder.")
            if not create:
                if not os.access(part, os.W_OK | os.X_OK):
                    raise OutputPathError(f"{what} {folder}: {part} is not writable (permission denied).")
                return folder
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"{what} {folder}: cannot create it ({error.strerror or error}).") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {folder}: the folder is not writable (permission denied).")
    return folder


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path` (atomic on POSIX).

    Use it for writers that want a file name, e.g. `with atomic_file(p) as tmp: image.save(tmp, format="PNG")`.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a folder.")
    check_output_folder(path.parent)
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputPathError(f"cannot write {path}: {error.strerror or error}.") from error
    os.close(fd)
    temp = Path(temp_name)
    os.chmod(temp, 0o666 & ~_current_umask())  # mkstemp makes 0600; the result should look like any new file
    try:
        yield temp
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
        _fsync_directory(path.parent)
    finally:
        if temp.exists():
            temp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp sibling, fsync, rename). Returns `path`."""
    with atomic_file(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def _contains(folder: Path, other: Path) -> bool:
    """Whether `other` is `folder` or lies inside it (both resolved)."""
    return other == folder or folder in other.parents


@contextmanager
def atomic_directory(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    is_replaceable: Callable[[Path], bool] | None = None,
    protected: tuple[str | os.PathLike, ...] = (),
) -> Iterator[Path]:
    """Yield an empty staging folder beside `output_dir`; when the block succeeds, it becomes `output_dir`.

    The swap: the old `output_dir` (if any) is renamed aside, the staging folder renamed to `output_dir`, and only
    then the old one is removed; if the block raises, only the staging folder is removed.

    Refused with `OutputPathError` before anything is written:
    - `output_dir` is a file, or its parent is read-only;
    - `output_dir` is, or contains, the current working directory or one of the `protected` paths (inputs);
    - `output_dir` is a non-empty folder for which `is_replaceable(output_dir)` is false, unless `overwrite`.
    """
    output_dir = Path(output_dir)
    target = output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"output folder {output_dir} is a file; give a folder path.")
    if target.parent == target:
        raise OutputPathError(f"output folder {output_dir} is the file-system root; give a new folder.")
    if _contains(target, Path.cwd().resolve()):
        raise OutputPathError(
            f"output folder {output_dir} is (or contains) the current directory, which would be replaced; give a "
            "new folder."
        )
    for path in protected:
        if _contains(target, Path(path).resolve()):
            raise OutputPathError(
                f"output folder {output_dir} holds the input {path}, which must not be replaced; give another folder."
            )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        if is_replaceable is None or not is_replaceable(output_dir):
            raise OutputPathError(
                f"output folder {output_dir} is not empty and does not hold a previous output of this command; "
                "choose a new or empty folder, or pass --overwrite to replace it."
            )
    parent = check_output_folder(target.parent, "parent of the output folder")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes 0700
    except OSError as error:
        raise OutputPathError(f"output folder {output_dir}: cannot write in {parent} ({error.strerror}).") from error
    try:
        yield staging
        _fsync_tree(staging)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old / target.name)
        try:
            os.replace(staging, target)
        except OSError:
            if old is not None:  # put the old folder back
                os.replace(old / target.name, target)
                old.rmdir()
            raise
        _fsync_directory(parent)
        if old is not None:  # the new folder is in place: failing to delete the old copy is only worth a warning
            try:
                shutil.rmtree(old)
            except OSError as error:
                warnings.warn(f"{output_dir} was replaced, but its previous content, moved to {old}, could not be "
                              f"removed ({error}); delete it yourself.", stacklevel=3)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
