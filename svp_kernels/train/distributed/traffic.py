"""Bytes a process communicates, counted where they are handed to torch.distributed.

While `counting(traffic)` is active, torch.distributed's point-to-point and collective entry points (isend,
send, irecv, recv, all_reduce, all_gather, broadcast) count the bytes of every tensor passed to them before
they run, whichever module calls them: the pipeline's links (protocol.py), the data-parallel collectives
(data_parallel.py) and DistributedDataParallel's gradient buckets (its comm hook, torch's own allreduce_hook,
calls torch.distributed.all_reduce). The counts are the payloads: what one process hands over per call
(send: what travels on the link; all_reduce: the tensor reduced; all_gather and broadcast: this process's
tensor). What crosses the wire per call follows from the algorithm (a ring all_reduce of n bytes over K
processes sends 2(K − 1)/K · n from each: bench/NOTES.md); `os_bytes_written()` reads the operating
system's count of bytes this process wrote (Linux /proc/self/io wchar, sockets included) to check that.

Counts are kept per phase ("train" or "eval", set by the worker; None counts nothing) and operation:
{phase: {operation: {"calls": n, "bytes": b}}}.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

OPERATIONS = ("isend", "send", "irecv", "recv", "all_reduce", "all_gather", "broadcast")
RECEIVES = ("irecv", "recv")  # bytes that arrive rather than leave; not part of bytes_sent


def tensor_bytes(value) -> int:
    """Bytes of a tensor, or of every tensor in a list/tuple of them."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(tensor_bytes(item) for item in value)


class Traffic:
    """Bytes handed to torch.distributed by this process, per phase and operation (see the module docstring)."""

    def __init__(self):
        self.phase: str | None = None
        self.counts: dict[str, dict[str, dict[str, int]]] = {}

    def add(self, operation: str, nbytes: int) -> None:
        if self.phase is None:
            return
        entry = self.counts.setdefault(self.phase, {}).setdefault(operation, {"calls": 0, "bytes": 0})
        entry["calls"] += 1
        entry["bytes"] += nbytes

    def bytes_sent(self, phase: str) -> int:
        """Bytes this process handed over in `phase`, receives excluded."""
        return sum(entry["bytes"] for operation, entry in self.counts.get(phase, {}).items()
                   if operation not in RECEIVES)


# the tensor argument each operation counts: all_gather(tensor_list, tensor) counts its own tensor
_COUNTED_ARGUMENT = {"isend": 0, "send": 0, "irecv": 0, "recv": 0, "all_reduce": 0, "all_gather": 1, "broadcast": 0}


@contextlib.contextmanager
def counting(traffic: Traffic):
    """Count every call of OPERATIONS into `traffic` while active (this process only; restored on exit)."""
    originals = {name: getattr(dist, name) for name in OPERATIONS}

    def counted(name, function):
        position = _COUNTED_ARGUMENT[name]

        def call(*args, **kwargs):
            tensor = args[position] if len(args) > position else kwargs["tensor"]
            traffic.add(name, tensor_bytes(tensor))
            return function(*args, **kwargs)
        call.__name__ = name
        return call

    for name, function in originals.items():
        setattr(dist, name, counted(name, function))
    try:
        yield traffic
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def os_bytes_written() -> int | None:
    """Bytes this process has written through system calls so far (sockets and files; Linux only, else None)."""
    try:
        with open("/proc/self/io") as handle:
            for line in handle:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


TRAFFIC_FIELDS = ("traffic", "bytes_sent_per_step", "bytes_sent_eval", "os_bytes_written")


def traffic_fields(traffic: Traffic, steps: int, written: int | None) -> dict:
    """What one process reports (TRAFFIC_FIELDS): its counts, bytes_sent_per_step (payloads of the train
    phase over its steps), bytes_sent_eval, and os_bytes_written over the whole training loop (evaluations
    included; None where unknown)."""
    return {"traffic": traffic.counts, "bytes_sent_per_step": traffic.bytes_sent("train") / max(steps, 1),
            "bytes_sent_eval": traffic.bytes_sent("eval"), "os_bytes_written": written}

