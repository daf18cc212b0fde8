"""The measured choice of backend="auto" / projection_path="auto" on CUDA: the reader of auto_table.py.

A candidate is a backend with one projection path, named as bench/local_loss.py names its variants: "cuda"
(the fused kernels), "cuda-gemm" (R̃ written out, then cuBLAS), "triton". A call (B, D, C, dtype, R) takes the
table's row of the same dtype and R at the nearest measured shape (distance between log2 B, log2 D, log2 C:
the shapes' sizes matter by their ratios), and of the candidates the caller allows (the backend and path it
asked for, what runs here) the one measured fastest there. None where the table has no row of that dtype and
R or no measured allowed candidate: the caller then keeps its fixed rule (svp_kernels.backends.choose).

Where one candidate wins at every measured shape of a dtype and R, the shape is not read at all, so a
torch.compile trace with dynamic sizes gets no guard on them from this choice.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

from . import auto_table


class Row(NamedTuple):
    """One measured shape of auto_table.ROWS: times[i] is the median ms of CANDIDATES[i] or UNMEASURED."""

    B: int
    D: int
    C: int
    dtype: str
    projection: str  # "dense" or "implicit"
    times: tuple
    fastest: str
    measured: str

    def best(self, allowed: Callable[[str], bool]) -> Optional[str]:
        """The fastest measured candidate of this row that `allowed` accepts, or None."""
        timed = [(ms, name) for name, ms in zip(auto_table.CANDIDATES, self.times)
                 if ms != auto_table.UNMEASURED and allowed(name)]
        return min(timed)[1] if timed else None


ROWS = tuple(Row(*row) for row in auto_table.ROWS)
# (dtype, R) -> its rows: built once at import, so a lookup inside torch.compile reads constants only.
_BY_KIND: dict = {}
for _row in ROWS:
    _BY_KIND.setdefault((_row.dtype, _row.projection), []).append(_row)


def log_distance(row: Row, shape: tuple) -> float:
    """Squared distance between (log2 B, log2 D, log2 C) of the row and of `shape`."""
    return sum((math.log2(a) - math.log2(max(int(b), 1))) ** 2 for a, b in zip((row.B, row.D, row.C), shape))


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
    return min(rows, key=lambda row: log_distance(row, shape)).best(allowed)
