"""The modules: RandomProjection (dense / implicit, fresh dropout each training step) and LocalLoss."""

import pytest
import torch

import svp_kernels as sk


def test_random_projection_dense_equals_implicit():
    dense = sk.nn.RandomProjection(12, 5, seed=3)
    implicit = sk.nn.RandomProjection(12, 5, seed=3, implicit=True)
    assert dense.weight.shape == (5, 12) and implicit.weight is None
    assert isinstance(implicit.projection, sk.ImplicitProjection)
    h = torch.randn(4, 12)
    torch.testing.assert_close(dense(h), implicit(h), rtol=1e-5, atol=1e-6)


def test_random_projection_dropout_only_in_training():
    projection = sk.nn.RandomProjection(16, 6, seed=1, p=0.5)
    h = torch.randn(3, 16)
    first, second = projection(h), projection(h)
    assert not torch.equal(first, second), "each training forward draws a fresh dropout seed"
    projection.eval()
    torch.testing.assert_close(projection(h), h @ projection.weight.t())


def test_random_projection_state_dict_round_trip():
    source = sk.nn.RandomProjection(8, 3, implicit=True, seed=99, std=0.5)
    target = sk.nn.RandomProjection(8, 3, implicit=True, seed=1)
    target.load_state_dict(source.state_dict())
    assert target.implicit == source.implicit


def test_local_loss_module():
    torch.manual_seed(0)
    layer_loss = sk.nn.LocalLoss(10, 4, p=0.2, alignment_weight=0.3, seed=5)
    h = torch.randn(6, 10, requires_grad=True)
    target = torch.randint(0, 4, (6,))
    out = layer_loss(h, target, torch.randn(6, 3))
    out.loss.backward()
    assert h.grad is not None and out.v.shape == (6, 4)
    last = sk.nn.LocalLoss(4, 4, identity=True)
    logits = torch.randn(6, 4, requires_grad=True)
    out = last(logits, target, out.v)
    torch.testing.assert_close(out.v, logits.detach())


def test_seed_stream_in_state_dict_reproduces_masks():
    """seed_state = [dropout_seed, step]: a module loaded from another's state_dict continues its mask sequence;
    forward(seed=...) uses that seed and leaves the stream where it was."""
    source = sk.nn.RandomProjection(16, 6, seed=1, p=0.5, dropout_seed=2024)
    h = torch.randn(3, 16)
    source(h)
    assert source.seed_state.tolist() == [2024, 1]
    assert torch.equal(source.state_dict()["seed_state"], source.seed_state)
    restored = sk.nn.RandomProjection(16, 6, seed=1, p=0.5)
    restored.load_state_dict(source.state_dict())
    assert torch.equal(restored(h), source(h)), "the same stream position gives the same mask"
    assert torch.equal(source(h, seed=5), sk.dropout_projection(h, source.weight, p=0.5, seed=5))
    assert source.seed_state.tolist() == [2024, 2]
    projection_seed = sk.projection.stream_seed(2024, 2)
    assert torch.equal(source(h), sk.dropout_projection(h, source.weight, p=0.5, seed=projection_seed))
    source.eval()
    source(h)
    assert source.seed_state.tolist() == [2024, 3], "eval mode draws no seed"


def test_local_loss_seed_stream_and_override():
    layer = sk.nn.LocalLoss(10, 4, p=0.3, seed=2, dropout_seed=7)
    assert layer.seed_state is layer.projection.seed_state
    assert sk.nn.LocalLoss(4, 4, identity=True).seed_state is None
    h, target = torch.randn(5, 10), torch.randint(0, 4, (5,))
    first, second = layer(h, target), layer(h, target)
    assert not torch.equal(first.v, second.v), "a fresh mask each training step"
    assert layer.seed_state.tolist() == [7, 2]
    with pytest.raises(ValueError, match="dropout_seed must be in"):
        sk.nn.LocalLoss(10, 4, dropout_seed=2**63)
    with pytest.raises(TypeError, match="dropout_seed must be an int"):
        sk.nn.RandomProjection(10, 4, dropout_seed=1.5)
    pinned = layer(h, target, seed=torch.tensor(11))
    assert torch.equal(pinned.v, layer(h, target, seed=11).v)
    assert layer.seed_state.tolist() == [7, 2]
