"""Training checkpoints: written atomically, verified on read, refused with the file and field named.

File layout: MAGIC (8 bytes) | payload length (uint64, little-endian) | SHA-256 of the payload (32 bytes) |
payload (torch.save of a dict of tensors, numbers, strings and lists, read back with weights_only=True).
A write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a crash
mid-write leaves the previous checkpoint (or none), never a broken one.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path

import torch

MAGIC = b"SVPCKPT1"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sQ32s")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the field."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Writes payload to path atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(_HEADER.pack(MAGIC, len(data), hashlib.sha256(data).digest()))
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_checkpoint(path: str | Path) -> dict:
    """The payload saved at path; CheckpointError if the file is missing, truncated, corrupt or foreign."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({error.strerror or error})") from error
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path}: field header: the file is truncated ({len(raw)} bytes, "
                              f"the header alone is {_HEADER.size})")
    magic, length, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"checkpoint {path}: field magic: {magic!r} is not {MAGIC!r}; "
                              "not an svp-train checkpoint")
    data = raw[_HEADER.size:]
    if len(data) != length:
        raise CheckpointError(f"checkpoint {path}: field payload: {len(data)} bytes where the header declares "
                              f"{length}; the file is truncated")
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: field payload: SHA-256 mismatch; the file is corrupt")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # an intact file whose payload torch cannot read (e.g. another torch format)
        raise CheckpointError(f"checkpoint {path}: field payload: unreadable ({type(error).__name__}: {error})") \
            from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path}: field payload: a {type(payload).__name__}, not a dict")
    version = payload.get("format")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: field format: version {version!r}, this svp-train reads "
                              f"{FORMAT_VERSION}")
    return payload


def check_state_shapes(path: str | Path, prefix: str, saved: dict, current: dict) -> None:
    """Every tensor of current (a state_dict) exists in saved with the same shape; else CheckpointError
    naming the field prefix.key."""
    for key, value in current.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key not in saved:
            raise CheckpointError(f"checkpoint {path}: field {prefix}.{key} is missing")
        if not isinstance(saved[key], torch.Tensor) or saved[key].shape != value.shape:
            shape = tuple(saved[key].shape) if isinstance(saved[key], torch.Tensor) else type(saved[key]).__name__
            raise CheckpointError(f"checkpoint {path}: field {prefix}.{key} has shape {shape}, this model "
                                  f"needs {tuple(value.shape)}")
    extra = sorted(set(saved) - set(current))
    if extra:
        raise CheckpointError(f"checkpoint {path}: field {prefix}.{extra[0]} does not exist in this model")
