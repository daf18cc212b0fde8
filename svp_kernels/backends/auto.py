"""The measured choice of backend="auto" / projection_path="auto" on CUDA: the reader of auto_table.py.

A candidate is a backend with one projection path, named as bench/local_loss.py names its variants: "cuda"
(the fused kernels), "cuda-gemm" (R̃ written out, then cuBLAS), "triton". A call (B, D, C, dtype, R) takes the
table's row of the same dtype and R at the nearest measured shape (distance between ⌊2·log2⌋ of B, D and C:
sizes matter by their ratios, in steps of √2), and of the candidates the caller allows (the backend and path it
asked for, what runs here) the one measured fastest there. None where the table has no row of that dtype and
R or no measured allowed candidate: the caller then keeps its fixed rule (svp_kernels.backends.choose).

Where one candidate wins at every measured shape of a dtype and R, the shape is not read at all, so a
torch.compile trace with dynamic sizes gets no guard on them from this choice.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from . import auto_table


class Row(NamedTuple):
    """One measured shape of auto_table.ROWS: times[i] is the median ms of CANDIDATES[i] or UNMEASURED;
    ranking: the measured candidates, fastest first (derived at import)."""

    B: int
    D: int
    C: int
    dtype: str
    projection: str  # "dense" or "implicit"
    times: tuple
    fastest: str
    measured: str
    ranking: tuple = ()

    def best(self, allowed: Callable[[str], bool]) -> Optional[str]:
        """The fastest measured candidate of this row that `allowed` accepts, or None. (A loop over names
        ranked at import: no comparison of times at call time, which torch.compile's tracer would refuse.)"""
        for name in self.ranking:
            if allowed(name):
                return name
        return None


def ranked(row: tuple) -> Row:
    """Row of an auto_table.ROWS entry, with its ranking."""
    row = Row(*row)
    timed = sorted((ms, name) for name, ms in zip(auto_table.CANDIDATES, row.times) if ms != auto_table.UNMEASURED)
    return row._replace(ranking=tuple(name for _, name in timed))


ROWS = tuple(ranked(row) for row in auto_table.ROWS)
# (dtype, R) -> its rows: built once at import, so a lookup inside torch.compile reads constants only.
_BY_KIND: dict = {}
for _row in ROWS:
    _BY_KIND.setdefault((_row.dtype, _row.projection), []).append(_row)


def half_log2(n) -> int:
    """⌊2·log2 n⌋ (0 for n ≤ 1) by integer comparisons only: on dynamic sizes torch.compile guards each one
    (a trace then holds for one √2-wide class of sizes) and never builds float math of a size."""
    k = 0
    while n * n >= 2 ** (k + 1):
        k += 1
    return k


def distance(row: Row, shape: tuple) -> int:
    """Squared distance between the half-log2 classes (half_log2) of (B, D, C) of the row and of `shape`."""
    return sum((half_log2(a) - half_log2(b)) ** 2 for a, b in zip((row.B, row.D, row.C), shape))


def measured_choice(dtype: str, projection: str, shape: tuple, allowed: Callable[[str], bool]) -> Optional[str]:
    """The candidate the table picks for a call of `shape` (B, D, C), `dtype` ("float32", ...) and `projection`
    ("dense" or "implicit") among those `allowed` accepts; None when the table does not decide (module
    docstring)."""
    rows = _BY_KIND.get((dtype, projection))
    if not rows:
        return None
    winners = {row.best(allowed) for row in rows}
    if len(winners) == 1:  # the same everywhere (or unmeasured everywhere): the shape does not matter
        return winners.pop()
    nearest, nearest_distance = rows[0], distance(rows[0], shape)
    for row in rows[1:]:  # the first of the nearest, in the table's order
        d = distance(row, shape)
        if d < nearest_distance:
            nearest, nearest_distance = row, d
    return nearest.best(allowed)
