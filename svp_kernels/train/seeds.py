"""Per-block dropout seed streams: a block's seed at a training step is a pure function of (run seed, block, step)."""

from __future__ import annotations

import torch

from ..philox import philox4x32_10


def block_step_seed(run_seed: int, block: int, step: int) -> int:
    """The 63-bit dropout seed of block `block` at training step `step` (0-based) of a run seeded `run_seed`.

    Philox4x32-10 with key run_seed at counter n = block·2³² + step: seed = (word0 mod 2³¹)·2³² + word1.
    It depends on nothing else, so a block draws the same masks in whichever process or device runs it.
    """
    return block_step_seeds(run_seed, block, step, 1)[0]


def block_step_seeds(run_seed: int, block: int, first_step: int, count: int) -> list[int]:
    """block_step_seed(run_seed, block, step) for step = first_step, …, first_step + count − 1, from one
    vectorised Philox call (a call costs ~150 tensor operations whatever its length)."""
    last_step = first_step + count - 1
    check_seed_arguments(run_seed, block, first_step, last_step)
    counters = block * 2**32 + torch.arange(first_step, last_step + 1, dtype=torch.int64)
    word0, word1, _, _ = philox4x32_10(run_seed, counters)
    return ((word0 & 0x7FFFFFFF) << 32 | word1).tolist()


def check_seed_arguments(run_seed: int, block: int, first_step: int, last_step: int) -> None:
    """ValueError unless 0 ≤ first_step ≤ last_step < 2**32, 0 ≤ block < 2**31 and 0 ≤ run_seed < 2**63."""
    if not (0 <= first_step <= last_step < 2**32 and 0 <= block < 2**31 and 0 <= run_seed < 2**63):
        step = first_step if first_step == last_step else f"{first_step}..{last_step}"
        raise ValueError(f"block_step_seed needs 0 ≤ step < 2**32, 0 ≤ block < 2**31, 0 ≤ run_seed < 2**63; "
                         f"got run_seed={run_seed}, block={block}, step={step}")
