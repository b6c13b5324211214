"""Files and directories written atomically with normal permissions, and read with errors that name the file.

Why: every output of a run (a drafter, a checkpoint, a shard, a resolved config) must either be complete or
absent, so a job killed mid-save (or out of disk) never leaves half a file that a later run trusts; and it must
be readable by another user or a serving container, so it gets the modes an ordinary `open()` would give
(0644 / 0755 under the usual umask 022), not the 0600 / 0700 of `tempfile`. Reading goes through here too, so
a truncated safetensors file or a Latin-1 JSON names its path instead of failing deep inside a library.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from massv.errors import CorruptFileError, MissingInputError

STAGING_SUFFIX = ".staging"


# --------------------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What `open(path, "w")` gives a new file: 0o666 minus the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    """What `mkdir` gives a new directory: 0o777 minus the umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def normalise_modes(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the ordinary modes (temporary files and folders start private)."""
    root = Path(root)
    files, folders = file_mode(), directory_mode()
    if root.is_file():
        os.chmod(root, files)
        return
    os.chmod(root, folders)
    for parent, directories, names in os.walk(root):
        for name in directories:
            os.chmod(os.path.join(parent, name), folders)
        for name in names:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, files)


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write `path` through a temporary sibling that is fsynced and renamed into place on success.

    On an exception the temporary file is removed and `path` keeps its old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """`path.write_text(text)`, but atomic (see `atomic_write`)."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dump_kwargs: Any) -> Path:
    """JSON (indented, sorted keys unless told otherwise, trailing newline), atomically."""
    dump_kwargs = {"indent": 2, "sort_keys": True, **dump_kwargs}
    return atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n")


# --------------------------------------------------------------------------------------------------
# Atomic directories
# --------------------------------------------------------------------------------------------------


def staging_path(directory: str | os.PathLike[str]) -> Path:
    """The fixed hidden sibling a directory is assembled in when several processes must find it (checkpoints)."""
    directory = Path(directory)
    return directory.with_name(f".{directory.name}{STAGING_SUFFIX}")


def prepare_staging(staging: str | os.PathLike[str]) -> Path:
    """An empty staging directory at a fixed path (a stale one from a killed job is removed first)."""
    staging = Path(staging)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def discard_staging(staging: str | os.PathLike[str]) -> None:
    """Remove a staging directory after a failed write (disk full, interrupt): nothing half-written stays."""
    shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """Give a fully written staging directory ordinary modes and swap it into place.

    The previous `directory`, if any, is moved aside first and removed only once the new one is in place,
    so at every instant one complete version exists.
    """
    staging, directory = Path(staging), Path(directory)
    normalise_modes(staging)
    backup = None
    if directory.exists():
        backup = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(directory, backup)
    os.replace(staging, directory)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return directory


@contextmanager
def atomic_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory in a private temporary sibling and publish it on success (`publish_directory`).

        with atomic_directory(out / "final") as staging:
            model.save_pretrained(staging)

    On an exception the staging directory is removed and `directory` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=STAGING_SUFFIX, dir=directory.parent))
    try:
        yield staging
        publish_directory(staging, directory)
    except BaseException:
        discard_staging(staging)
        raise


# --------------------------------------------------------------------------------------------------
# Reading, with errors that name the file
# --------------------------------------------------------------------------------------------------


def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """UTF-8 text of `path`; a missing file or another encoding is an error that names the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingInputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise MissingInputError(f"{what} {path} is a directory, expected a file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CorruptFileError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, offset {error.start}): "
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parsed JSON of `path`; errors name the file and the line."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptFileError(f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno}, "
                               f"column {error.colno}") from None


def check_safetensors(path: str | os.PathLike[str]) -> None:
    """Fail, naming the file, unless `path` is a complete safetensors file (header and every tensor's bytes).

    Reads the header only (cheap, no tensor is loaded), so a whole model directory can be checked before any
    model is built.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_length <= 0 or 8 + header_length > size:
                raise ValueError("the header is cut short")
            header = json.loads(handle.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + header_length + end > size:
            raise ValueError(f"the tensors need {8 + header_length + end} bytes, the file has {size}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"{path} is not a complete safetensors file ({error}): it was probably cut short "
                               "by an interrupted copy, download or save; write or download it again") from None


def load_safetensors(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """`safetensors.torch.load_file`, checked first so that a truncated file names itself."""
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # safetensors raises its own SafetensorError, a plain Exception subclass
        raise CorruptFileError(f"{path} cannot be read as safetensors: {error}") from None
