"""The randomness spec of docs/design.md §3, pinned by golden values (Random123's known answer first)."""

import pytest
import torch

import svp_kernels as sk
from svp_kernels.philox import implicit_weight, keep_mask, philox4x32_10, u24
from svp_kernels.testing import philox_words

GOLDEN_WORDS = [
    # (seed, offset n, words) — counter (lo32(n), hi32(n), 0, 0), key (lo32(seed), hi32(seed))
    (0, 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),  # Random123 known answer
    (1, 1, (0xAC08141B, 0xDFC5CCBE, 0x79C07A47, 0xA7F66093)),
    (0x123456789ABCDEF, 2**31 + 5, (0xDDE1AB00, 0xB59AC23C, 0x330E976A, 0x609CA219)),  # 64-bit offset
    (2**63 - 1, 2**40 + 7, (0xE83F7E62, 0x4983E13A, 0xC4D82545, 0xF6749C1E)),
]

GOLDEN_MASK = [  # keep_mask(seed=2024, C=4, D=9, p=0.3)
    [1, 1, 1, 1, 0, 1, 1, 0, 0],
    [1, 0, 1, 0, 1, 0, 1, 1, 1],
    [1, 1, 0, 1, 1, 1, 0, 0, 0],
    [0, 1, 1, 0, 1, 0, 1, 1, 1],
]


@pytest.mark.parametrize("seed,offset,words", GOLDEN_WORDS)
def test_golden_words(seed, offset, words):
    got = philox4x32_10(seed, torch.tensor([offset]))
    assert tuple(int(w) for w in got) == words


@pytest.mark.skipif("cpu" not in sk.available_backends(), reason="compiled extension not built")
@pytest.mark.parametrize("seed,offset,words", GOLDEN_WORDS)
def test_golden_words_in_cpp(seed, offset, words):
    assert tuple(philox_words(seed, torch.tensor([offset]), backend="cpu")[0].tolist()) == words


def test_golden_mask_and_conversions():
    assert keep_mask(2024, 4, 9, 0.3).int().tolist() == GOLDEN_MASK
    assert keep_mask(2024, 4, 9, 0.0).all(), "p = 0 keeps everything"
    assert u24(torch.tensor([0, 255, 256, 0xFFFFFFFF])).tolist() == [0.0, 0.0, 2.0**-24, 1.0 - 2.0**-24]
    assert torch.equal(u24(philox4x32_10(7, torch.arange(4))[0]),
                       torch.tensor([0.9545971155166626, 0.4069603681564331, 0.006075084209442139,
                                     0.39019906520843506]))


def test_golden_implicit_weight():
    expected = torch.tensor([[-0.3450148105621338, -1.7993123531341553, 2.1204185485839844],
                             [2.296948194503784, 0.019613904878497124, 1.166387915611267]])
    torch.testing.assert_close(implicit_weight(77, 2, 3, 1.0), expected, rtol=2e-7, atol=0)
    assert sk.ImplicitProjection(2, seed=77, std=1.0).materialize(3).dtype == torch.float32


def test_implicit_weight_statistics():
    weight = sk.ImplicitProjection(64, seed=5).materialize(1024)
    assert abs(weight.mean().item()) < 3e-3 and abs(weight.std().item() * 1024**0.5 - 1.0) < 1e-2


def test_mask_keep_rate_and_independence_of_seed():
    mask = keep_mask(11, 200, 500, 0.25)
    assert abs(mask.float().mean().item() - 0.75) < 5e-3
    assert not torch.equal(mask, keep_mask(12, 200, 500, 0.25))
