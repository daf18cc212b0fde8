"""Bad input: a ValueError/TypeError naming the argument and what was expected, for every backend."""

import math

import pytest
import torch

import svp_kernels as sk
from svp_kernels.testing import cpu_backends

B, D, C = 4, 6, 3


def good():
    return dict(h=torch.randn(B, D), target=torch.randint(0, C, (B,)), v_prev=torch.randn(B, 2),
                projection=torch.randn(C, D), p=0.1, seed=1)


def call(backend="auto", **changes):
    args = good()
    args.update(changes)
    h, target, v_prev = args.pop("h"), args.pop("target"), args.pop("v_prev")
    return sk.fused_local_loss(h, target, v_prev, backend=backend, **args)


BAD_INPUTS = [
    # (id, changes, exception, message fragment)
    ("h-not-tensor", dict(h=[[1.0]]), TypeError, "h must be a torch.Tensor"),
    ("h-integer", dict(h=torch.ones(B, D, dtype=torch.int64)), TypeError, "h must be a floating-point"),
    ("h-rank-1", dict(h=torch.randn(D)), ValueError, "h must have shape"),
    ("h-empty-batch", dict(h=torch.randn(0, D), target=torch.zeros(0, dtype=torch.int64), v_prev=None), ValueError,
     "empty batch"),
    ("projection-columns", dict(projection=torch.randn(C, D + 1)), ValueError, "projection has 7 columns but h has 6"),
    ("projection-rank", dict(projection=torch.randn(C)), ValueError, "projection must have shape"),
    ("projection-type", dict(projection="dense"), TypeError, "projection must be None"),
    ("projection-requires-grad", dict(projection=torch.randn(C, D, requires_grad=True)), ValueError,
     "projection requires grad"),
    ("projection-dtype", dict(projection=torch.randn(C, D, dtype=torch.float64)), TypeError, "projection has dtype"),
    ("target-float", dict(target=torch.zeros(B)), TypeError, "target must hold integer"),
    ("target-bool", dict(target=torch.zeros(B, dtype=torch.bool)), TypeError, "target must hold integer"),
    ("target-shape", dict(target=torch.zeros(B + 1, dtype=torch.int64)), ValueError, "target must have shape"),
    ("target-2d", dict(target=torch.zeros(B, 1, dtype=torch.int64)), ValueError, "target must have shape"),
    ("target-too-large", dict(target=torch.tensor([0, 1, 2, 3])), ValueError, r"target values must be in \[0, 3\)"),
    ("target-negative", dict(target=torch.tensor([0, -1, 2, 1])), ValueError, "target values must be in"),
    ("target-huge", dict(target=torch.tensor([0, 10**9, 2, 1])), ValueError, r"got values in \[0, 1000000000\]"),
    ("target-list", dict(target=[0, 1, 2, 0]), TypeError, "target must be a torch.Tensor"),
    ("v_prev-batch", dict(v_prev=torch.randn(B + 1, 2)), ValueError, "v_prev has 5 rows"),
    ("v_prev-rank", dict(v_prev=torch.randn(B)), ValueError, "v_prev must have shape"),
    ("v_prev-dtype", dict(v_prev=torch.randn(B, 2, dtype=torch.float64)), TypeError, "v_prev has dtype"),
    ("v_prev-type", dict(v_prev=3.0), TypeError, "v_prev must be a torch.Tensor"),
    ("p-negative", dict(p=-0.1), ValueError, r"p must be in \[0, 1\)"),
    ("p-one", dict(p=1.0), ValueError, r"p must be in \[0, 1\)"),
    ("p-nan", dict(p=math.nan), ValueError, r"p must be in \[0, 1\)"),
    ("p-string", dict(p="0.1"), TypeError, "p must be a float"),
    ("p-with-identity", dict(projection=None, h=torch.randn(B, C)), ValueError, "dropout applies to R"),
    ("seed-negative", dict(seed=-1), ValueError, "seed must be in"),
    ("seed-huge", dict(seed=2**63), ValueError, "seed must be in"),
    ("seed-float", dict(seed=1.5), TypeError, "seed must be an int"),
    ("reduction", dict(reduction="max"), ValueError, "reduction must be 'mean' or 'sum'"),
    ("center", dict(center="yes"), TypeError, "center must be a bool"),
    ("alignment-weight-negative", dict(alignment_weight=-1.0), ValueError, "alignment_weight must be"),
    ("alignment-weight-inf", dict(alignment_weight=math.inf), ValueError, "alignment_weight must be"),
    ("identity-width", dict(projection=None, p=0.0, target=torch.tensor([0, 1, 2, 6])), ValueError,
     r"target values must be in \[0, 6\)"),
]


@pytest.mark.parametrize("backend", ["auto", *cpu_backends()])
@pytest.mark.parametrize("changes,exception,message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises(changes, exception, message, backend):
    with pytest.raises(exception, match=message):
        call(backend=backend, **changes)


def test_good_input_passes():
    call()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        call(backend="tpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        call(backend=3)


def test_environment_override(monkeypatch):
    monkeypatch.setenv("SVP_KERNELS_BACKEND", "reference")
    assert sk.backends.resolve("auto", torch.device("cpu"), torch.float32).NAME == "reference"
    if "cpu" in sk.available_backends():
        assert sk.backends.resolve("cpu", torch.device("cpu"), torch.float32).NAME == "cpu", \
            "the variable overrides only backend='auto'"
    monkeypatch.setenv("SVP_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable SVP_KERNELS_BACKEND must be"):
        call()
    # the similarity losses resolve their backend argument through the same registry, with the same message
    with pytest.raises(ValueError, match="environment variable SVP_KERNELS_BACKEND must be"):
        sk.similarity_loss(torch.randn(B, D), torch.randint(0, C, (B,)), num_classes=C)


def _train_one_block(target):
    from svp_kernels.train import LayerwiseTrainer, mlp

    torch.manual_seed(0)
    trainer = LayerwiseTrainer(mlp((1, 2, 3), C, width=8, depth=1), p=0.1, seed=0)
    inputs = torch.randn(B, 1, 2, 3)
    trainer.train_block(0, inputs, trainer.input_alignment(inputs), target, 0)


# Every path that takes class indices: the ops and the trainer's per-block step (its lean path included).
TARGET_PATHS = {
    "fused_local_loss": lambda target: call(target=target),
    "predsim_loss": lambda target: sk.predsim_loss(torch.randn(B, D), torch.randn(B, 5), target,
                                                   torch.randn(C, D)),
    "similarity_loss": lambda target: sk.similarity_loss(torch.randn(B, D), target, num_classes=C),
    "train_block": _train_one_block,
}


@pytest.mark.parametrize("path", TARGET_PATHS)
def test_one_target_range_rule_and_message(path):
    """One rule (checked on the host for CPU targets) and one message for a target outside [0, C)."""
    for bad in (C, -1):
        target = torch.tensor([0, 1, bad, 2])
        with pytest.raises(ValueError, match=rf"^target values must be in \[0, {C}\) \(C = {C} classes\), "
                                             rf"got values in \[{min(bad, 0)}, {max(bad, 2)}\]$"):
            TARGET_PATHS[path](target)
    TARGET_PATHS[path](torch.tensor([0, 1, C - 1, 2]))  # in range: no error


def test_result_tuple_keeps_its_first_name():
    """sk.LocalLoss (pinned, docs/design.md §4) is the result tuple LocalLossOutput; sk.nn.LocalLoss the module."""
    assert sk.LocalLoss is sk.LocalLossOutput
    assert isinstance(call(), sk.LocalLoss)
    assert issubclass(sk.nn.LocalLoss, torch.nn.Module)


def test_backend_unsupported_dtype_or_device():
    if "cpu" in sk.available_backends():
        with pytest.raises(ValueError, match="does not support torch.bfloat16"):
            call(backend="cpu", h=torch.randn(B, D, dtype=torch.bfloat16),
                 projection=torch.randn(C, D, dtype=torch.bfloat16), v_prev=None)
    if "cuda" not in sk.available_backends():
        with pytest.raises(ValueError, match="backend 'cuda' is not available"):
            call(backend="cuda")


def test_gradient_interface_detection():
    """The fused backends take the one-node eager path only with all three gradient-interface functions."""
    import types

    from svp_kernels import backends

    assert not backends.has_gradient_interface(backends.load("reference"))
    for name in sk.available_backends():
        if name != "reference":
            assert backends.has_gradient_interface(backends.load(name)), name
    partial = types.SimpleNamespace(projection_value=len, epilogue_with_grad=len, projection_backward=None)
    assert not backends.has_gradient_interface(partial)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_that_differ():
    with pytest.raises(ValueError, match="projection is on cuda"):
        call(projection=torch.randn(C, D, device="cuda"))


def test_other_ops_validate():
    with pytest.raises(ValueError, match="v_prev has 3 rows"):
        sk.alignment_loss(torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(TypeError, match="v_prev must be a torch.Tensor"):
        sk.alignment_loss(torch.randn(4, 3), None)
    with pytest.raises(ValueError, match="reduction must be"):
        sk.alignment_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="none")
    with pytest.raises(ValueError, match="empty batch"):
        sk.cosine_gram(torch.randn(0, 3))
    with pytest.raises(ValueError, match="projection has 5 columns"):
        sk.dropout_projection(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="p must be in"):
        sk.dropout_projection(torch.randn(4, 3), torch.randn(2, 3), p=1.5)
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        sk.ImplicitProjection(0, seed=1)
    with pytest.raises(ValueError, match="seed must be an int"):
        sk.ImplicitProjection(3, seed=-5)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        sk.ImplicitProjection(3, seed=5).materialize(0)


def test_unavailable_backends_say_why():
    for name in sk.backends.BACKEND_NAMES:
        reason = sk.backends.unavailable_reason(name)
        assert (reason is None) == sk.backends.is_available(name), (name, reason)
        assert reason is None or isinstance(reason, str) and reason
    assert sk.backends.unavailable_reason("reference") is None


def test_required_backend_that_is_missing_fails_the_session(monkeypatch):
    import conftest

    unavailable = [name for name in sk.backends.BACKEND_NAMES if not sk.backends.is_available(name)]
    for required, message in [("reference,tpu", "'tpu' is not a backend"),
                              *[(name, f"{name}: {sk.backends.unavailable_reason(name)}") for name in unavailable]]:
        monkeypatch.setenv(conftest.REQUIRE_ENV, required)
        with pytest.raises(pytest.exit.Exception, match="required backends are unavailable") as raised:
            conftest.pytest_sessionstart(None)
        assert message in str(raised.value)
    monkeypatch.setenv(conftest.REQUIRE_ENV, ",".join(sk.available_backends()))
    conftest.pytest_sessionstart(None)
