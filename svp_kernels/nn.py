"""Modules over the ops: a fixed random projection with dropout on R, and the SVP local loss."""

from __future__ import annotations

from typing import Optional

import torch

from .api import LocalLoss as LocalLossOutput
from .api import dropout_projection, fused_local_loss
from .projection import ImplicitProjection, draw_seed


class RandomProjection(torch.nn.Module):
    """v = h (R ⊙ M / (1 − p))ᵀ with a fixed Gaussian R (out_features × in_features), std 1/√D by default.

    Dense (implicit=False): R is a buffer, materialised from the same Philox formula. Implicit: only the
    seed is kept and kernels regenerate R. A fresh dropout seed is drawn every training forward; in eval
    mode there is no dropout.
    """

    def __init__(self, in_features: int, out_features: int, *, implicit: bool = False, seed: Optional[int] = None,
                 p: float = 0.0, std: Optional[float] = None, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.in_features, self.out_features, self.p, self.backend = in_features, out_features, float(p), backend
        self.implicit = ImplicitProjection(out_features, draw_seed() if seed is None else seed, std)
        if implicit:
            self.register_buffer("weight", None)
        else:
            self.register_buffer("weight", self.implicit.materialize(in_features, device=device, dtype=dtype))

    @property
    def projection(self):
        """What to pass as ``projection=``: the dense R buffer, or the ImplicitProjection."""
        return self.implicit if self.weight is None else self.weight

    def forward(self, h: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        """h (B, D) -> v (B, C) in h's dtype."""
        p = self.p if self.training else 0.0
        return dropout_projection(h, self.projection, p=p, seed=seed, backend=self.backend)

    def get_extra_state(self):
        return {"seed": self.implicit.seed, "std": self.implicit.std}

    def set_extra_state(self, state):
        self.implicit = ImplicitProjection(self.out_features, state["seed"], state["std"])

    def extra_repr(self) -> str:
        kind = "implicit" if self.weight is None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, p={self.p}, {kind}"


class LocalLoss(torch.nn.Module):
    """The SVP local loss of one layer: CE(v, y) + λ‖S(v) − S(v_prev)‖²_F with v = Dropout(R) h.

    out_features is C, the width of v (targets must lie in [0, C)); identity=True (needs
    in_features == out_features) uses v = h, as the last layer does on its logits.
    forward(h, target, v_prev=None, seed=None) returns svp_kernels.LocalLoss.
    """

    def __init__(self, in_features: int, out_features: int, *, identity: bool = False, p: float = 0.0,
                 alignment_weight: float = 1.0, reduction: str = "mean", center: bool = False,
                 implicit: bool = False, seed: Optional[int] = None, std: Optional[float] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if identity and in_features != out_features:
            raise ValueError(f"identity=True needs in_features == out_features, got {in_features} and {out_features}")
        self.projection = None if identity else RandomProjection(
            in_features, out_features, implicit=implicit, seed=seed, p=p, std=std, backend=backend,
            device=device, dtype=dtype)
        self.alignment_weight, self.reduction, self.center, self.backend = alignment_weight, reduction, center, backend

    def forward(self, h: torch.Tensor, target: torch.Tensor, v_prev: Optional[torch.Tensor] = None,
                seed: Optional[int] = None) -> LocalLossOutput:
        projection, p = None, 0.0
        if self.projection is not None:
            projection = self.projection.projection
            p = self.projection.p if self.training else 0.0
        return fused_local_loss(h, target, v_prev, projection=projection, p=p, seed=seed,
                                alignment_weight=self.alignment_weight, reduction=self.reduction,
                                center=self.center, backend=self.backend)
