"""Where this package may write, and atomic writes that never delete what they did not create.

One ownership rule for every writer (`align-detr convert/export/predict/demo`, `save_pretrained` of our classes, the
model card, benchmarks):

- A file may be replaced only if the same writer wrote it and it is unchanged since, or the caller says `overwrite`.
  What a writer wrote is recorded, with its sha256, in a small manifest (`.align_detr_manifest.json`) in the folder
  that holds the file ([`record_output`]).
- A folder that a writer builds as a whole (a converted model, the demo's `model/` and `data/`) may be replaced only if
  everything in it is such a file; with `overwrite`, the new files are written into it and what the writer did not
  write is kept (never deleted).
- An output may never be one of the command's inputs (or a folder holding one); it may not lie inside an input folder
  (the model folder a command reads) unless the caller says `overwrite`.

[`claim_output`] checks one path against the rule (before any work); [`owned_file`] and [`atomic_directory`] write
under it: a temporary sibling (or staging folder) that is fsynced and renamed into place, recorded in the manifest.
A refusal is an `OutputPathError` (a `ValueError`) with a one-line message naming the path and the reason.
Everything written gets the modes of any new file (0666 / 0777 minus the umask), not mkstemp's private 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "MANIFEST_NAME",
    "OutputPathError",
    "atomic_directory",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_folder",
    "claim_output",
    "is_own_output",
    "model_input_folders",
    "owned_file",
    "owned_files_in",
    "read_manifest",
    "record_output",
    "sha256_of_file",
]

MANIFEST_NAME = ".align_detr_manifest.json"
_SEPARATORS = tuple({os.sep, os.altsep or os.sep})
# the files `from_pretrained` reads from a model folder: inputs that no output may replace, even with `overwrite`
_MODEL_FILE_PATTERNS = ("config.json", "preprocessor_config.json", "generation_config.json", "*.safetensors",
                        "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.py")
_OVERWRITE_HINT = "pass --overwrite (overwrite=True) to replace it"


class OutputPathError(ValueError):
    """An output path we cannot or may not write; the message names it and says why."""


# ------------------------------------------------------------------------------------------------ the manifest


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike) -> dict[str, dict]:
    """What the manifest of `folder` records: file name -> {"sha256", "size", "writer"} ({} if none)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}  # none, unreadable or damaged: nothing in this folder counts as ours
    return files if isinstance(files, dict) else {}


def _write_manifest(folder: Path, files: dict[str, dict]) -> None:
    text = json.dumps({"written_by": "align-detr-hf", "files": dict(sorted(files.items()))}, indent=1) + "\n"
    atomic_write_bytes(folder / MANIFEST_NAME, text.encode("utf-8"))


def record_output(paths: str | os.PathLike | Iterable[str | os.PathLike], writer: str) -> None:
    """Record files (or every file under a folder) as written by `writer`, as they are now (sha256), in the manifest of
    the folder that holds each file. Entries of files that no longer exist are dropped."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    by_folder: dict[Path, list[Path]] = {}
    for path in map(Path, paths):
        files = [path] if not path.is_dir() else [Path(d) / n for d, _, names in os.walk(path) for n in names]
        for file in files:
            if file.name != MANIFEST_NAME and file.is_file() and not file.is_symlink():
                by_folder.setdefault(file.parent, []).append(file)
    for folder, files in by_folder.items():
        entries = {name: entry for name, entry in read_manifest(folder).items() if (folder / name).is_file()}
        for file in files:
            entries[file.name] = {"sha256": sha256_of_file(file), "size": file.stat().st_size, "writer": writer}
        _write_manifest(folder, entries)


def _ownership(path: Path, writer: str) -> str | None:
    """None if `path` is a file that `writer` wrote and nobody changed since; else why it is not."""
    if path.is_symlink() or not path.is_file():
        return "it is not a file align-detr wrote"
    entry = read_manifest(path.parent).get(path.name)
    if not isinstance(entry, dict):
        return "align-detr did not write it"
    if entry.get("writer") != writer:
        return f"it was written by {entry.get('writer')}, not by {writer}"
    if entry.get("size") != path.stat().st_size or entry.get("sha256") != sha256_of_file(path):
        return f"it was changed since {writer} wrote it"
    return None


def is_own_output(path: str | os.PathLike, writer: str) -> bool:
    """Whether `path` is a file `writer` wrote (per the manifest beside it) and that is unchanged since."""
    return _ownership(Path(path), writer) is None


def _foreign_entries(folder: Path, writer: str) -> list[tuple[str, str]]:
    """(relative path, reason) of everything under `folder` that is not an unchanged file of `writer`."""
    foreign = []
    for current, dirs, files in os.walk(folder):
        current = Path(current)
        for name in dirs:
            sub = current / name
            if sub.is_symlink() or not any(sub.iterdir()):  # a link, or an empty folder we would not have made
                foreign.append((str(sub.relative_to(folder)), "align-detr did not make it"))
        for name in files:
            if name != MANIFEST_NAME and (reason := _ownership(current / name, writer)) is not None:
                foreign.append((str((current / name).relative_to(folder)), reason))
    return sorted(foreign)


# ------------------------------------------------------------------------------------------------ the rule


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_inputs(path: Path, inputs: Iterable, overwrite: bool, folder: bool) -> None:
    target = path.expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source or _same_file(target, source):
            raise OutputPathError(f"refused to write {path}: it is the input {given} of this command; choose "
                                  "another output path.")
        if folder and _is_within(source, target):
            raise OutputPathError(f"refused to write {path}: it holds the input {given}, which must not be replaced; "
                                  "give another folder.")
        if source.is_dir() and _is_within(target, source) and not overwrite:
            raise OutputPathError(f"refused to write {path}: it is inside the folder {given} that this command reads "
                                  "(the model); choose another path, or pass --overwrite (overwrite=True) to write "
                                  "there anyway.")


def claim_output(
    path: str | os.PathLike,
    writer: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    folder: bool = False,
) -> Path:
    """Check, before any work, that `writer` may write `path`; raise `OutputPathError` (one line) if not.

    `folder=False`: `path` is a file to be replaced: allowed if it does not exist, or `writer` wrote it and it is
    unchanged since, or `overwrite`. `folder=True`: `path` is a folder the writer builds as a whole: allowed if it
    does not exist, is empty, holds only such files, or `overwrite` (then only the writer's files are replaced).
    Always refused: `path` is one of `inputs` (or, as a folder, holds one), or lies inside an input folder unless
    `overwrite`; a file in place of a folder or the reverse; a folder that is the file-system root or holds the
    current directory. Returns `Path(path)`.
    """
    if not str(path).strip():
        raise OutputPathError("refused to write an output at an empty path; give a file or folder name.")
    if not folder and str(path).endswith(_SEPARATORS):  # "out/" names a folder; Path() would drop the slash
        raise OutputPathError(f"refused to write {path}: it ends with a path separator (a folder); give a file name.")
    path = Path(path)
    _check_inputs(path, inputs, overwrite, folder)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"refused to write {path}: {parent} is a file, not a folder.")
    if not folder:
        if path.is_dir() and not path.is_symlink():
            raise OutputPathError(f"refused to write {path}: it is a folder; give a file name.")
        if (path.exists() or path.is_symlink()) and not overwrite:
            reason = _ownership(path, writer)
            if reason is not None:
                raise OutputPathError(f"refused to replace {path}: {reason}; choose another path, or "
                                      f"{_OVERWRITE_HINT}.")
        return path
    target = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output folder {path} is a file; give a folder path.")
    if target.parent == target:
        raise OutputPathError(f"output folder {path} is the file-system root; give a new folder.")
    if _is_within(Path.cwd().resolve(), target):
        raise OutputPathError(f"output folder {path} is (or contains) the current directory, which would be "
                              "replaced; give a new folder.")
    if path.is_dir() and not overwrite:
        foreign = _foreign_entries(path, writer)
        if foreign:
            (name, reason), more = foreign[0], len(foreign) - 1
            raise OutputPathError(
                f"refused to replace the folder {path}: it holds {name} ({reason})"
                + (f" and {more} more such entr{'y' if more == 1 else 'ies'}" if more else "")
                + "; choose a new or empty folder, or pass --overwrite (overwrite=True) to write into it (files "
                f"{writer} did not write are kept)."
            )
    return path


def model_input_folders(name_or_path: str | os.PathLike | None) -> tuple[Path, ...]:
    """The folders a command reads a model from, as `inputs` of [`claim_output`]: a local model folder and the files
    of it that loading reads (config, weights, code: never replaced, even with `overwrite`), or for a Hub id the
    Hugging Face cache that holds its files."""
    if not name_or_path:
        return ()
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        files = sorted({file for pattern in _MODEL_FILE_PATTERNS for file in local.glob(pattern) if file.is_file()})
        return (local, *files)
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE),)


# ------------------------------------------------------------------------------------------------ writing


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


def _current_umask() -> int:
    try:  # Linux: read it without changing it (setting it, even briefly, races with other threads' writes)
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def _finish_tree(root: Path) -> None:
    """fsync every file and folder at or under `root` and give them the modes of any new file or folder: the one
    place where mkstemp's 0600 / mkdtemp's 0700 and library writers' private modes (safetensors) are undone."""
    mask = _current_umask()
    files = [root] if not root.is_dir() else [Path(d, n) for d, _, names in os.walk(root) for n in names]
    for file in files:
        os.chmod(file, 0o666 & ~mask)
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    if root.is_dir():
        for folder, _, _ in os.walk(root):
            os.chmod(folder, 0o777 & ~mask)
            _fsync_directory(Path(folder))


def check_output_folder(folder: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Create `folder` (and parents) if needed; raise `OutputPathError` if it is a file or not writable.
    With `create=False` only check that it could be created and written (nothing is made on disk)."""
    if not str(folder).strip():
        raise OutputPathError(f"{what} is empty; give a folder name.")
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


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path` (atomic on POSIX).

    No ownership check (see [`owned_file`]). Use it for writers that want a file name, e.g.
    `with atomic_file(p) as tmp: image.save(tmp, format="PNG")`.
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
    try:
        yield temp
        _finish_tree(temp)
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


@contextmanager
def owned_file(
    path: str | os.PathLike, writer: str, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """[`claim_output`] + [`atomic_file`] + [`record_output`]: yield a temporary path that becomes `path`."""
    inputs = tuple(inputs)
    path = claim_output(path, writer, overwrite=overwrite, inputs=inputs)
    with atomic_file(path) as temp:
        yield temp
        claim_output(path, writer, overwrite=overwrite, inputs=inputs)  # still ours after the (slow) work?
    record_output(path, writer)


def _move_into(staging: Path, dest: Path, writer: str, overwrite: bool, stale: Callable[[str], bool]) -> None:
    """Move every file of `staging` to the same place under `dest` (each claimed first, all before any move), then,
    if this write renews files that `stale` names, remove the other such files of `writer` (unchanged ones only), and
    record what was written."""
    new = sorted(Path(d, n).relative_to(staging) for d, _, names in os.walk(staging) for n in names
                 if n != MANIFEST_NAME)
    for rel in new:
        claim_output(dest / rel, writer, overwrite=overwrite)
    _finish_tree(staging)
    for rel in new:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dest / rel)
    written = {dest / rel for rel in new}
    renews_stale = any(stale(str(rel)) for rel in new)  # e.g. a save that writes weights replaces all earlier shards
    for folder in {manifest.parent for manifest in dest.rglob(MANIFEST_NAME)} if renews_stale else ():
        for name in read_manifest(folder):
            old = folder / name
            if old not in written and stale(str(old.relative_to(dest))) and is_own_output(old, writer):
                old.unlink()
        _fsync_directory(folder)
    record_output(written, writer)


@contextmanager
def atomic_directory(
    output_dir: str | os.PathLike,
    writer: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield an empty staging folder beside `output_dir`; when the block succeeds, its content becomes `output_dir`.

    Refused before anything is written ([`claim_output`] with `folder=True`). At the end, if `output_dir` holds only
    unchanged files of `writer` (or nothing), it is swapped: the old folder renamed aside, the staging folder renamed
    into place, then the old one removed. Otherwise (`overwrite`, or files appeared meanwhile) the new files are moved
    into it one by one and what `writer` did not write is kept. If the block raises, only the staging folder is
    removed.
    """
    inputs = tuple(inputs)
    output_dir = claim_output(output_dir, writer, overwrite=overwrite, inputs=inputs, folder=True)
    target = output_dir.resolve()
    parent = check_output_folder(target.parent, "parent of the output folder")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))
    except OSError as error:
        raise OutputPathError(f"output folder {output_dir}: cannot write in {parent} ({error.strerror}).") from error
    try:
        yield staging
        if target.is_dir() and _foreign_entries(target, writer):
            _move_into(staging, target, writer, overwrite, stale=lambda rel: True)
            return
        for manifest in staging.rglob(MANIFEST_NAME):  # inner writers' records: this writer owns the whole folder
            manifest.unlink()
        record_output(staging, writer)
        _finish_tree(staging)
        _swap_in(staging, target, parent, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _swap_in(staging: Path, target: Path, parent: Path, shown: Path) -> None:
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
            warnings.warn(f"{shown} was replaced, but its previous content, moved to {old}, could not be removed "
                          f"({error}); delete it yourself.", stacklevel=4)


@contextmanager
def owned_files_in(
    folder: str | os.PathLike,
    writer: str,
    *,
    overwrite: bool = False,
    stale: Callable[[str], bool] = lambda rel: False,
) -> Iterator[Path]:
    """Yield a staging folder inside `folder`; when the block succeeds, each file written there is moved to the same
    place in `folder`, where it may replace only a file `writer` wrote and nobody changed (or any, with `overwrite`).
    Other files in `folder` are kept, except, when this write writes files that `stale` names, the other unchanged
    such files of `writer` (e.g. the weight shards of an earlier save). For writers that add files to a folder, such
    as `save_pretrained`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"refused to write into {folder}: it is a file, not a folder.")
    check_output_folder(folder)
    staging = Path(tempfile.mkdtemp(prefix=".align_detr.staging-", dir=folder))
    try:
        yield staging
        _move_into(staging, folder, writer, overwrite, stale)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
