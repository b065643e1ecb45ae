"""Atomic file and folder writes: an interrupted run leaves the old artifact intact, never half of a new one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """Give a temporary file/folder the permissions a plainly created one would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 4 MB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Sorted, indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


class OutputFolderError(ValueError):
    """An output path that would overwrite something that is not an artifact of the same kind."""


def _canonical_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, so equal tensors give equal bytes.

    The safetensors writer emits ``__metadata__`` in hash-map order, which changes from process to
    process. Only the header is rewritten; tensor data and their offsets stay as they are.
    """
    with path.open("r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        encoded = canonical.encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        if len(encoded) == length:
            handle.seek(8)
            handle.write(encoded)
            return
        data_start = 8 + length
    rewritten = path.with_name(path.name + ".canonical")
    try:
        with path.open("rb") as source, rewritten.open("wb") as target:
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            source.seek(data_start)
            shutil.copyfileobj(source, target, 1 << 22)
        os.replace(rewritten, path)
    finally:
        rewritten.unlink(missing_ok=True)


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors through a temporary file, then rename.

    The header is written in sorted order, so identical tensors and metadata give identical bytes
    (and hashes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
        _canonical_safetensors_header(Path(tmp))
        _publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_non_folder(path: Path) -> bool:
    """Whether something other than a real folder (a file, a link...) is at ``path`` (one lstat)."""
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _refuse_foreign(path: Path, marker: str, what: str) -> None:
    """Raise unless ``path`` is absent, an empty folder, or a folder holding ``marker``."""
    if _is_non_folder(path):
        raise OutputFolderError(
            f"output {path} exists and is not a folder; choose another output folder"
        )
    try:
        foreign = path.is_dir() and not (path / marker).is_file() and any(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # replaced meanwhile by another writer
        foreign = False
    if foreign and not (path / marker).is_file():  # a second look: another writer may be mid-swap
        raise OutputFolderError(
            f"output folder {path} is not empty and is not a {what} (no {marker}); choose another "
            "output folder (it would be replaced as a whole)"
        )


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(
    path: str | Path,
    marker: str,
    what: str,
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = True,
) -> Path:
    """Check, before any work, that a result folder may be written at ``path``.

    Refused (:class:`OutputFolderError`): a file at ``path``; a non-empty folder that is not a
    ``what`` (recognised by its ``marker`` file); with ``overwrite=False``, an existing ``what``
    (the CLI's ``--force`` allows it); an output equal to, inside, or containing one of ``inputs``
    (paths that do not exist are ignored); a place where no folder can be created (read-only, or
    below a file).
    """
    path = Path(path)
    target = path.resolve()
    for source in inputs:  # first: the most precise reason ("train --subspace X --out X")
        if source is None or not Path(source).exists():
            continue
        resolved = Path(source).resolve()
        if target == resolved or resolved in target.parents or target in resolved.parents:
            raise OutputFolderError(
                f"output folder {path} would overwrite the input {source}; choose another output "
                "folder"
            )
    _refuse_foreign(path, marker, what)
    if (path / marker).is_file() and not overwrite:
        raise OutputFolderError(
            f"output folder {path} already holds a {what}; pass --force to replace it (or choose "
            "another output folder)"
        )
    check_writable(path)
    return path


def check_writable(path: str | Path) -> None:
    """Raise :class:`OutputFolderError` unless ``path`` (a file or folder) can be created or replaced.

    Tried for real (a temporary file in the nearest existing parent), so read-only mounts and
    full disks are found even when running as root.
    """
    path = Path(path)
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise OutputFolderError(f"cannot create output {path}: {parent} is not a folder")
    try:
        probe_fd, probe_path = tempfile.mkstemp(dir=parent, prefix=".lenssteer-write-test.")
        os.close(probe_fd)
        os.unlink(probe_path)
    except OSError as error:
        raise OutputFolderError(
            f"cannot write output {path}: {parent} is not writable ({error.strerror})"
        ) from None


_REPLACE_ERRNOS = {errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR}


@contextmanager
def atomic_directory(
    path: str | Path, marker: str | None = None, what: str = "result folder"
) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces ``path`` in one rename, on error it vanishes.

    An existing folder at ``path`` stays untouched until the new one is complete, and is replaced
    as a whole (never merged). A file at ``path`` is refused (:class:`OutputFolderError`), and
    with ``marker`` so is a non-empty folder without that file, before and after the work. Several
    writers of the same folder at once are safe: the last rename wins, none fails, no scratch or
    old folder is left behind.
    """
    path = Path(path)
    if marker is not None:
        _refuse_foreign(path, marker, what)
    elif _is_non_folder(path):
        raise OutputFolderError(f"output {path} exists and is not a folder; choose another one")
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old_folders: list[Path] = []
    try:
        yield scratch
        _publish_mode(scratch, directory=True)
        if marker is not None:
            _refuse_foreign(path, marker, what)
        elif _is_non_folder(path):
            raise OutputFolderError(f"output {path} exists and is not a folder; choose another one")
        for _attempt in range(1000):
            try:
                os.replace(scratch, path)  # succeeds when path is absent or an empty folder
                break
            except OSError as error:
                if error.errno not in _REPLACE_ERRNOS:
                    raise
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            try:
                os.replace(path, old)  # another writer may have moved or replaced it meanwhile
            except FileNotFoundError:
                continue
            old_folders.append(old)
        else:
            raise OSError(f"could not replace {path}: other writers kept replacing it")
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        for old in old_folders:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
