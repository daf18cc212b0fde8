"""Training checkpoints, one format for single-process and distributed runs: written atomically, verified on
read, refused with the file and field named.

File layout: MAGIC (8 bytes) | payload length (uint64, little-endian) | SHA-256 of the payload (32 bytes) |
payload (torch.save of a dict of tensors, numbers, strings and lists, read back with weights_only=True).
A write goes to a temporary file in the same folder, is fsynced, then renamed over the target, so a crash
mid-write leaves the previous checkpoint (or none), never a broken one. A read checks the length and the
SHA-256 before it unpickles anything, and unpickles with weights_only=True: a file that is truncated, corrupt,
of another program, or crafted to run code when unpickled is refused, and no code in it ever runs.

The payload is a dict with "format" (FORMAT_VERSION) and "kind": "single-process" (svp-train --checkpoint;
files written before distributed runs shared this format have no "kind" and are single-process ones) or
"distributed" (one file per process of --stage-checkpoints). Its tensors come back starting on 64-byte
boundaries (svp_kernels/train/aligned.py), as freshly allocated state would.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from .aligned import aligned

MAGIC = b"SVPCKPT1"
FORMAT_VERSION = 1
KINDS = ("single-process", "distributed")
_HEADER = struct.Struct("<8sQ32s")
_ZIP_MAGIC = b"PK\x03\x04"  # what a plain torch.save file starts with


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


def read_checkpoint(path: str | Path, kind: str = "single-process") -> dict:
    """The payload saved at path, a checkpoint of `kind` (KINDS); CheckpointError if the file is missing,
    truncated, corrupt, foreign, crafted, or of the other kind."""
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
        what = "not an svp-train checkpoint"
        if magic.startswith(_ZIP_MAGIC):
            what = "a plain torch.save file (another program's, or a distributed checkpoint older than this format), " \
                "which svp-train never unpickles"
        raise CheckpointError(f"checkpoint {path}: field magic: {magic!r} is not {MAGIC!r}; {what}")
    data = raw[_HEADER.size:]
    if len(data) != length:
        raise CheckpointError(f"checkpoint {path}: field payload: {len(data)} bytes where the header declares "
                              f"{length}; the file is truncated")
    if hashlib.sha256(data).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: field payload: SHA-256 mismatch; the file is corrupt")
    try:  # weights_only: tensors, containers and numbers only; any other object is refused, never built
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # an intact file whose payload torch refuses (crafted) or cannot read
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"checkpoint {path}: field payload: refused by torch.load(weights_only=True), "
                              f"nothing in it was run ({type(error).__name__}: {reason})") from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path}: field payload: a {type(payload).__name__}, not a dict")
    version = payload.get("format")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: field format: version {version!r}, this svp-train reads "
                              f"{FORMAT_VERSION}")
    found = payload.get("kind", "single-process")
    if found != kind:
        usage = {"single-process": "svp-train --resume", "distributed": "svp-train --stage-checkpoints"}
        raise CheckpointError(f"checkpoint {path}: field kind: a {found!r} checkpoint (of "
                              f"{usage.get(found, 'no run')}); this run reads {kind!r} ones ({usage[kind]})")
    return _aligned_tensors(payload)


def _aligned_tensors(value):
    """value with every tensor in it (nested dicts, lists and tuples) starting on a 64-byte boundary."""
    if isinstance(value, torch.Tensor):
        return aligned(value)
    if isinstance(value, dict):
        return type(value)((key, _aligned_tensors(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_aligned_tensors(item) for item in value)
    return value


@contextmanager
def loading(path: str | Path, field: str):
    """Turns what a well-formed but ill-fitting payload makes torch or Python raise while `field` is checked or
    loaded (a missing key, a wrong type, a state dict that does not fit) into a CheckpointError naming the
    file and the field."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"checkpoint {path}: field {field}: does not fit this run "
                              f"({type(error).__name__}: {reason})") from error


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
