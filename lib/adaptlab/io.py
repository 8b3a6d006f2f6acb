"""Atomic file writes, JSON records and a streaming safetensors writer.

Everything a stage writes appears under its final name only when complete: it is written to a
temporary name in the same folder and renamed, so a killed job never leaves a half-written file
that a later stage (or a resumed run) would trust. Finished files get the mode an ordinary
``open()`` would give them (0644 under umask 022), so colleagues in a group can read results;
the temporary files a killed write leaves are removed by :func:`sweep_temporaries`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptlab.errors import UserError


class CorruptFileError(UserError):
    """A file this project wrote (a manifest, a record) that no longer parses."""


_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


_UMASK_LOCK = threading.Lock()
TEMP_SUFFIX = ".adaptlab-tmp"
"""Temporary files are ``.{name}.{random}.adaptlab-tmp`` beside their target (folders:
``.{name}.adaptlab-tmp``): a name no user file has, so sweeping them never hits one."""
ASIDE_SUFFIX = ".adaptlab-old"
"""A finished folder moved aside while its new version is renamed into place."""


def current_umask() -> int:
    """This process's umask, read without changing it where Linux allows (``/proc``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def _temporary_file(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` with ordinary permissions (mkstemp makes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, file_mode())
    return fd, tmp


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    fd, tmp = _temporary_file(path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Write one JSON object per line, atomically (the parent folder is made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a :class:`CorruptFileError`."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"{path} is not valid JSON ({err}); it was damaged or edited by hand: restore it, or "
            "delete the folder it belongs to and run again."
        ) from err


def sweep_temporaries(folder: str | Path) -> list[Path]:
    """Remove what killed atomic writes left under ``folder``; returns what was removed.

    Temporary files and folders (``.{name}*.adaptlab-tmp``) are always incomplete. A folder
    moved aside during a swap (``.{name}.adaptlab-old``, see ``adaptlab.training.checkpoint``)
    is removed only when ``{name}`` exists again; otherwise it is the last good copy and stays.
    Call it only on a folder whose run lock this process holds (``adaptlab.rundir``), so that no
    live write is hit.
    """
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        name = path.name
        stale = name.endswith(TEMP_SUFFIX) or (
            name.endswith(ASIDE_SUFFIX) and (path.parent / name[1 : -len(ASIDE_SUFFIX)]).exists()
        )
        if not stale or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """``safetensors.torch.save_file``, atomically (temporary name, then rename)."""
    path = Path(path)
    fd, tmp = _temporary_file(path)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def concat_to_safetensors(
    path: str | Path,
    name: str,
    parts: Iterable[tuple[Path, str]],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    metadata: dict[str, str] | None = None,
) -> None:
    """Concatenate tensors stored in several safetensors files along dim 0 into one file.

    safetensors cannot append, so this writes the format by hand (8-byte header length, JSON
    header, raw row-major bytes) and copies one part at a time: memory stays at one part, not
    the whole ``[N, ...]`` result. The result is an ordinary safetensors file.

    Args:
        path: output file.
        name: tensor name in the output.
        parts: ``(file, key)`` pairs in row order; each tensor is ``[n_i, *shape[1:]]``.
        shape: full output shape ``[sum n_i, ...]``.
        dtype: tensor dtype (parts are cast to it).
        metadata: optional string metadata stored in the header.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize
    for dim in shape:
        nbytes *= dim
    header: dict[str, Any] = {
        name: {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}
    }
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    written = 0
    with atomic_open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for file, key in parts:
            with safe_open(str(file), framework="pt") as f:
                tensor = f.get_tensor(key).to(dtype).contiguous()
            if tuple(tensor.shape[1:]) != tuple(shape[1:]):
                raise ValueError(
                    f"{file}:{key} has shape {tuple(tensor.shape)}, expected rows of {shape[1:]}."
                )
            data = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            handle.write(data)
            written += len(data)
    if written != nbytes:
        Path(path).unlink(missing_ok=True)
        raise ValueError(f"{path}: wrote {written} bytes for shape {shape}, expected {nbytes}.")
