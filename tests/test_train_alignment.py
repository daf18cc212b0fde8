"""Every tensor the trainer computes on starts on a 64-byte boundary, wherever it came from: a pipeline message,
a replica's share of a batch, a checkpoint, a data loader, a user's view. A GEMM's code path may depend on the
address of its operands (MKL on AMD Zen 4 sums in another order off a 64-byte boundary), so bit-identity
between processes rests on this (docs/design.md §7). The tests check the addresses themselves, so they fail on
any machine when the alignment breaks, whether or not its BLAS would change a bit."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from svp_kernels.train import LayerwiseTrainer, mlp
from svp_kernels.train.aligned import ALIGNMENT, aligned, aligned_empty, is_aligned
from svp_kernels.train.checkpoint import read_checkpoint, save_checkpoint
from svp_kernels.train.data import _standardized, synthetic
from svp_kernels.train.distributed.common import replica_rows
from svp_kernels.train.distributed.data_parallel import join_rows
from svp_kernels.train.distributed.pipeline import _source_messages
from svp_kernels.train.distributed.protocol import EPOCH_END, EVAL, STOP, TRAIN, Message, Packing, _take
from svp_kernels.train.extras import progress_bar
from svp_kernels.train.run import TrainConfig

aten = torch.ops.aten
# The ops whose result may depend on where their operands lie: BLAS / oneDNN products, and the project's own.
COMPUTE = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.addbmm, aten.mv, aten.addmv, aten.dot, aten.vdot,
           aten.addr, aten.convolution, aten.convolution_backward, aten._convolution}


class ComputeInputs(TorchDispatchMode):
    """Records every call of a COMPUTE op or an svp_kernels op with a tensor argument off a 64-byte boundary.
    0-dim tensors are exempt: a kernel reads them as one value (the per-block dropout seeds are 0-dim views
    into one device buffer, svp_kernels/train/graphs.py's StepScalars), no product's code path depends on them."""

    def __init__(self):
        super().__init__()
        self.misaligned: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in COMPUTE or func.namespace == "svp_kernels":
            for tensor in tree_leaves((args, kwargs)):
                if isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and not is_aligned(tensor):
                    self.misaligned.append(f"{func}: {tuple(tensor.shape)} at {tensor.data_ptr() % ALIGNMENT} "
                                           f"bytes past a {ALIGNMENT}-byte boundary")
        return func(*args, **kwargs)


def off_boundary(tensor: torch.Tensor, offset: int = 4) -> torch.Tensor:
    """A copy of tensor `offset` bytes past a 64-byte boundary (what a view into a packed buffer can be)."""
    nbytes = tensor.numel() * tensor.element_size()
    view = aligned_empty(nbytes + ALIGNMENT)[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
    assert not is_aligned(view)
    return view.copy_(tensor)


def trainer(seed: int = 3) -> LayerwiseTrainer:
    torch.manual_seed(seed)
    return LayerwiseTrainer(mlp((1, 5, 5), 4, width=24, depth=3), method="svp", p=0.2, lr=1e-2, backend="cpu",
                            seed=seed)


def test_aligned_copies_only_what_lies_off_a_boundary():
    fresh = torch.randn(7, 3)
    assert aligned(fresh) is fresh and is_aligned(fresh)
    view = off_boundary(fresh, 12)
    copy = aligned(view)
    assert is_aligned(copy) and torch.equal(copy, fresh) and copy.data_ptr() != view.data_ptr()
    assert is_aligned(torch.empty(0)[0:0]) and aligned(fresh[1:]).data_ptr() != fresh[1:].data_ptr()


def test_aligned_empty_aligns_where_the_allocator_does_not(monkeypatch):
    real_empty = torch.empty
    calls = []

    def misaligning_empty(size, *args, **kwargs):  # the first buffer 8 bytes off a boundary
        calls.append(size)
        if len(calls) == 1:
            return real_empty(size + ALIGNMENT, *args, **kwargs)[8:8 + size]
        return real_empty(size, *args, **kwargs)

    monkeypatch.setattr(torch, "empty", misaligning_empty)
    buffer = aligned_empty(100)
    assert len(calls) == 2 and buffer.numel() == 100 and is_aligned(buffer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", [TRAIN, EVAL, EPOCH_END, STOP])
@pytest.mark.parametrize("batch, h_shape, h_rows, v_width", [(1, (5,), None, 3), (57, (24,), None, 4),
                                                           (7, (3, 5, 5), 4, 10), (56, (24,), 27, 11)])
def test_every_field_of_a_packed_message_starts_on_a_64_byte_boundary(dtype, kind, batch, h_shape, h_rows,
                                                                      v_width):
    """The header is 24 bytes and h, v hold odd numbers of 2- to 8-byte elements: each field is placed on the
    next boundary, and the buffer itself starts on one."""
    packing = Packing(kind, batch, h_shape, v_width, dtype, h_rows)
    buffer = _take([], packing.nbytes, torch.device("cpu"))
    assert is_aligned(buffer)
    for name, view in packing.views(buffer).items():
        assert packing.fields[name][0] % ALIGNMENT == 0 and is_aligned(view), name
    rows = batch if h_rows is None else h_rows
    message = Message(kind, 5, torch.randn(rows, *h_shape).to(dtype), torch.randn(batch, v_width).to(dtype),
                      torch.arange(batch)) if kind in (TRAIN, EVAL) else Message(kind)
    if kind == EVAL:
        message.v = None
    packing.pack(message, buffer)
    header, received = packing.unpack(buffer)
    assert header == (kind, batch if kind in (TRAIN, EVAL) else 0, 5 if kind in (TRAIN, EVAL) else 0)
    for name in ("h", "v", "targets"):
        sent, got = getattr(message, name), getattr(received, name)
        assert (sent is None) == (got is None), name
        if got is not None:
            assert torch.equal(got, sent) and is_aligned(got), name


def test_a_stage_computes_on_messages_shares_and_user_views_only_at_64_byte_boundaries():
    """Under a dispatch mode that sees every product: a stage training its blocks on the views of a received
    message (the public op's first step and the lean path's later ones) and on a caller's views off a
    boundary, evaluating on a message, a data-parallel
    replica training on its share of a batch (rows 5…10 of 11: its gradient rows lie off the start of the
    whole batch's), and the sequential step and evaluation on a user's views off a boundary."""
    batch, width, classes = 57, 24, 4
    stage = trainer()
    targets = torch.arange(batch) % classes
    recorder = ComputeInputs()
    with recorder:
        for step in range(2):  # the validated public op, then the lean path
            packing = Packing(TRAIN, batch, (width,), classes, torch.float32)
            buffer = _take([], packing.nbytes, torch.device("cpu"))
            packing.pack(Message(TRAIN, step, torch.randn(batch, width), torch.randn(batch, classes), targets),
                         buffer)
            _, message = packing.unpack(buffer)
            h, v = message.h, message.v
            for index in (2, 3):
                h, v, _ = stage.train_block(index, h, v, message.targets, message.step)
        # a caller's own views (another transport than the pipeline's links)
        stage.train_block(2, off_boundary(torch.randn(batch, width)), off_boundary(torch.randn(batch, classes)),
                          targets, 2)
        stage.model.eval()
        with torch.no_grad():
            packing = Packing(EVAL, batch, (width,), classes, torch.float32)
            buffer = _take([], packing.nbytes, torch.device("cpu"))
            packing.pack(Message(EVAL, 0, torch.randn(batch, width), None, targets), buffer)
            h = packing.unpack(buffer)[1].h
            for index in (2, 3):  # the pipeline's evaluation of a message (pipeline.py)
                h = stage.model.blocks[index](h)

        replica = trainer()
        others = torch.randn(5, classes)

        class SecondOfTwo:
            """This process holds rows 5…10 of an 11-row batch; rows 0…4 come from the other one."""

            batch_size, rows = 11, slice(5, 11)

            def gather(self, v):
                return join_rows([others, v[:0]], v, 1)

            def reduce_gradients(self, parameters):
                pass

        share_targets = torch.arange(11) % classes
        for step in range(2):
            replica.train_block(1, torch.randn(6, width), torch.randn(11, classes), share_targets, step, SecondOfTwo())

        sequential = trainer()
        inputs, user_targets = off_boundary(torch.randn(batch, 1, 5, 5)), torch.arange(batch) % classes
        for _ in range(2):
            sequential.train_step(inputs, user_targets)
        sequential.evaluate(inputs, user_targets, batch_size=19)
    assert not recorder.misaligned, "\n".join(recorder.misaligned[:10])


def test_datasets_and_replica_shares_start_on_64_byte_boundaries():
    """Standardised images (numpy's allocations are 16-byte aligned), a replica's rows of a batch and of a test
    slice, with rows of 100 bytes (so that a share off the batch's start is off a boundary)."""
    images = off_boundary(torch.arange(7 * 25, dtype=torch.float32).view(7, 1, 5, 5)).numpy()
    dataset = _standardized("images", images, torch.arange(7).numpy() % 2, images[:3], [0, 1, 0], 2)
    assert is_aligned(dataset.train_inputs) and is_aligned(dataset.test_inputs)
    batch = torch.randn(57, 1, 5, 5)
    for replicas in (2, 3):
        shares = [replica_rows(batch, replicas, replica, torch.device("cpu")) for replica in range(replicas)]
        assert all(map(is_aligned, shares)) and torch.equal(torch.cat(shares), batch)

    data = synthetic(num_train=60, num_test=50, input_shape=(1, 5, 5), num_classes=4)
    config = TrainConfig(dataset="synthetic", batch_size=57, augment_shift=1, backend="cpu")
    schedule = [(TRAIN, 0, torch.arange(57)), (EVAL, 0, range(0, 50)), (EPOCH_END, 0, None)]
    for replica in range(2):
        messages = list(_source_messages(trainer(), config, data, schedule, progress_bar(disable=True), replica, 2))
        assert is_aligned(messages[0].h) and is_aligned(messages[1].h)
        assert torch.equal(messages[1].h, data.test_inputs[25 * replica:25 * replica + 25])


def test_checkpoint_tensors_come_back_on_64_byte_boundaries(tmp_path):
    """A tensor saved as a view 4 bytes into its storage loads as a view there; the reader realigns it."""
    base = torch.arange(10, dtype=torch.float32)
    path = tmp_path / "views.ckpt"
    save_checkpoint(path, {"format": 1, "state": {"view": base[1:], "nested": [base[3:5]]}})
    payload = read_checkpoint(path)
    view, nested = payload["state"]["view"], payload["state"]["nested"][0]
    assert is_aligned(view) and is_aligned(nested)
    assert torch.equal(view, base[1:]) and torch.equal(nested, base[3:5])
