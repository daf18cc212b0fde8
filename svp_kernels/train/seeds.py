"""Per-block dropout seed streams: a block's seed at a training step is a pure function of (run seed, block, step)."""

from __future__ import annotations

import torch

from ..philox import philox4x32_10


def block_step_seed(run_seed: int, block: int, step: int) -> int:
    """The 63-bit dropout seed of block `block` at training step `step` (0-based) of a run seeded `run_seed`.

    Philox4x32-10 with key run_seed at counter n = block·2³² + step: seed = (word0 mod 2³¹)·2³² + word1.
    It depends on nothing else, so a block draws the same masks in whichever process or device runs it.
    """
    if not (0 <= step < 2**32 and 0 <= block < 2**31 and 0 <= run_seed < 2**63):
        raise ValueError(f"block_step_seed needs 0 ≤ step < 2**32, 0 ≤ block < 2**31, 0 ≤ run_seed < 2**63; "
                         f"got run_seed={run_seed}, block={block}, step={step}")
    word0, word1, _, _ = philox4x32_10(run_seed, torch.tensor([block * 2**32 + step], dtype=torch.int64))
    return (int(word0) & 0x7FFFFFFF) << 32 | int(word1)
