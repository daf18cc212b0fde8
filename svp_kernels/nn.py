"""Modules over the ops: a fixed random projection with dropout on R, and the SVP local loss."""

from __future__ import annotations

from typing import Optional

import torch

from .api import LocalLossOutput, dropout_projection, fused_local_loss
from .projection import MAX_SEED, ImplicitProjection, draw_seed, stream_seed
from .validation import ALIGNMENTS, check_choice


class RandomProjection(torch.nn.Module):
    """v = h (R ⊙ M / (1 − p))ᵀ with a fixed Gaussian R (out_features × in_features), std 1/√D by default.

    Dense (implicit=False): R is a buffer, materialised from the same Philox formula. Implicit: only the
    seed is kept and kernels regenerate R. In eval mode there is no dropout.

    Dropout seeds come from a stream: the buffer ``seed_state`` = [base, step] (int64, saved in the
    state_dict, moved by .to()). Each training forward with p > 0 uses stream_seed(base, step) and then
    increments step in place, all with tensor ops on the buffer's device: eager, torch.compile (any mode)
    and a captured CUDA graph draw the same fresh mask sequence from the same module state. dropout_seed is
    the base (None: draw one from torch's default generator); forward(h, seed=...) overrides one step
    without advancing the stream.
    """

    def __init__(self, in_features: int, out_features: int, *, implicit: bool = False, seed: Optional[int] = None,
                 p: float = 0.0, std: Optional[float] = None, backend: str = "auto",
                 dropout_seed: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        if dropout_seed is not None:
            if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
                raise TypeError(f"dropout_seed must be an int in [0, 2**63) or None, got {type(dropout_seed).__name__}")
            if not 0 <= dropout_seed < MAX_SEED:
                raise ValueError(f"dropout_seed must be in [0, 2**63), got {dropout_seed}")
        self.in_features, self.out_features, self.p, self.backend = in_features, out_features, float(p), backend
        self.implicit = ImplicitProjection(out_features, draw_seed() if seed is None else seed, std)
        if implicit:
            self.register_buffer("weight", None)
        else:
            self.register_buffer("weight", self.implicit.materialize(in_features, device=device, dtype=dtype))
        base = draw_seed() if dropout_seed is None else dropout_seed
        self.register_buffer("seed_state", torch.tensor([base, 0], dtype=torch.int64, device=device))

    @property
    def projection(self):
        """What to pass as ``projection=``: the dense R buffer, or the ImplicitProjection."""
        return self.implicit if self.weight is None else self.weight

    def next_seed(self) -> torch.Tensor:
        """This step's dropout seed, stream_seed(base, step) (0-dim int64 on the buffer's device); step += 1."""
        seed = stream_seed(self.seed_state[0], self.seed_state[1])
        self.seed_state[1].add_(1)
        return seed

    def _dropout_args(self, seed):
        """(p, seed) for one forward: no dropout in eval mode; else `seed` if given, or the stream's next seed."""
        if not self.training or self.p == 0.0:
            return 0.0, seed
        return self.p, self.next_seed() if seed is None else seed

    def forward(self, h: torch.Tensor, seed=None) -> torch.Tensor:
        """h (B, D) -> v (B, C) in h's dtype. seed: None (the stream), an int or a 0-dim int64 tensor."""
        p, seed = self._dropout_args(seed)
        return dropout_projection(h, self.projection, p=p, seed=seed, backend=self.backend)

    def get_extra_state(self):
        return {"seed": self.implicit.seed, "std": self.implicit.std}

    def set_extra_state(self, state):
        self.implicit = ImplicitProjection(self.out_features, state["seed"], state["std"])

    def extra_repr(self) -> str:
        kind = "implicit" if self.weight is None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, {kind}"


class LocalLoss(torch.nn.Module):
    """The SVP local loss of one layer: CE(v, y) + λ‖S(v) − S(v_prev)‖²_F with v = Dropout(R) h, or with
    alignment="bhattacharyya" CE(v, y) + λ·mean_b BD(v_b, v_prev_b) (fused_local_loss's `alignment`).

    out_features is C, the width of v (targets must lie in [0, C)); identity=True (needs
    in_features == out_features) uses v = h, as the last layer does on its logits.
    forward(h, target, v_prev=None, seed=None) returns svp_kernels.LocalLossOutput. Training dropout seeds come
    from the projection's seed stream (``seed_state``, see RandomProjection; base = dropout_seed), so the
    module compiles with fullgraph and draws a fresh mask each step; seed= (int or 0-dim int64 tensor)
    overrides one step.
    """

    def __init__(self, in_features: int, out_features: int, *, identity: bool = False, p: float = 0.0,
                 alignment_weight: float = 1.0, reduction: str = "mean", center: bool = False,
                 implicit: bool = False, seed: Optional[int] = None, std: Optional[float] = None,
                 backend: str = "auto", dropout_seed: Optional[int] = None, device=None, dtype=None,
                 alignment: str = "cosine_gram"):
        super().__init__()
        self.alignment = check_choice(alignment, "alignment", ALIGNMENTS)
        if identity and in_features != out_features:
            raise ValueError(f"identity=True needs in_features == out_features, got {in_features} and {out_features}")
        self.projection = None if identity else RandomProjection(
            in_features, out_features, implicit=implicit, seed=seed, p=p, std=std, backend=backend,
            dropout_seed=dropout_seed, device=device, dtype=dtype)
        self.alignment_weight, self.reduction, self.center, self.backend = alignment_weight, reduction, center, backend

    @property
    def seed_state(self) -> Optional[torch.Tensor]:
        """The projection's dropout seed stream [base, step] (None for the identity, which has no dropout)."""
        return None if self.projection is None else self.projection.seed_state

    def forward(self, h: torch.Tensor, target: torch.Tensor, v_prev: Optional[torch.Tensor] = None,
                seed=None) -> LocalLossOutput:
        projection, p = None, 0.0
        if self.projection is not None:
            projection = self.projection.projection
            p, seed = self.projection._dropout_args(seed)
        return fused_local_loss(h, target, v_prev, projection=projection, p=p, seed=seed,
                                alignment_weight=self.alignment_weight, reduction=self.reduction,
                                center=self.center, backend=self.backend, alignment=self.alignment)
