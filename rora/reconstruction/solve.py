"""Damped least squares of one linear map from accumulated statistics, in float64.

A projection y = x W^T + b is refitted to targets from sums over calibration tokens only: the Gram matrix of
[x, 1] and its cross sums with y. Memory is (input width + 1)^2, whatever the number of tokens, and any candidate
(W, b) is scored on other tokens' sums in closed form, so the damping is chosen on held-out calibration text
without running the model again.

The fit minimises  sum ||y - x W^T - b||^2 + lambda ||W - W_old||^2  (the bias is not damped), where lambda is
`damping` times the mean diagonal of the Gram matrix (scale-free). `bias_only` keeps W and sets b to the mean
residual: FLAP's compensation (the removed channels' mean contribution) generalised to any prune, since the
residual also carries what the layers below lost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class LinearStats:
    """Sums over tokens of x x^T, x, x y^T, y and ||y||^2 (float64 totals), for inputs x [.., d_in] and targets y
    [.., d_out]."""

    def __init__(self, d_in: int, d_out: int, device=None):
        f64 = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(d_in, d_in, **f64)
        self.sum_x = torch.zeros(d_in, **f64)
        self.cross = torch.zeros(d_in, d_out, **f64)
        self.sum_y = torch.zeros(d_out, **f64)
        self.yy = torch.zeros((), **f64)
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch. Its products are formed in the inputs' precision, at least float32 (a model's float32
        activations carry no more; float64 products cost ~4x on a CPU), and summed into the float64 totals, which lose
        nothing as batches add up."""
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        x = x.reshape(-1, x.shape[-1]).to(self.gram.device, dtype)
        y = y.reshape(-1, y.shape[-1]).to(self.gram.device, dtype)
        for total, part in ((self.gram, x.T @ x), (self.sum_x, x.sum(0)), (self.cross, x.T @ y),
                            (self.sum_y, y.sum(0)), (self.yy, (y * y).sum())):
            total += part.to(torch.float64)
        self.n += x.shape[0]

    def __add__(self, other: "LinearStats") -> "LinearStats":
        out = LinearStats(0, 0)
        for name in ("gram", "sum_x", "cross", "sum_y", "yy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.n = self.n + other.n
        return out

    def sse(self, weight: torch.Tensor, bias: torch.Tensor) -> float:
        """sum ||y - x W^T - b||^2 over the accumulated tokens, for W [d_out, d_in] and b [d_out]."""
        w, b = weight.to(self.gram), bias.to(self.gram)
        fit = (w @ self.gram * w).sum() + 2 * b @ (w @ self.sum_x) + self.n * (b @ b)
        return float(self.yy - 2 * ((w * self.cross.T).sum() + b @ self.sum_y) + fit)


@dataclass
class Fit:
    """A candidate (W, b) for one projection and the name of the rule that made it."""

    rule: str  # "unchanged", "bias" or "lstsq"
    damping: float | None
    weight: torch.Tensor
    bias: torch.Tensor


def bias_only(stats: LinearStats, weight: torch.Tensor) -> torch.Tensor:
    """The b minimising the squared error with W fixed: the mean of y - x W^T."""
    w = weight.to(stats.gram)
    return (stats.sum_y - w @ stats.sum_x) / max(stats.n, 1)


def lstsq(stats: LinearStats, weight: torch.Tensor, bias: torch.Tensor, damping: float,
          fit_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising the damped squared error (see the module docstring); with `fit_bias` False, b stays."""
    d_in = stats.gram.shape[0]
    w_old, b_old = weight.to(stats.gram), bias.to(stats.gram)
    lam = damping * float(stats.gram.diagonal().mean())
    if fit_bias:
        n = torch.tensor([[float(stats.n)]], dtype=torch.float64, device=stats.gram.device)
        gram = torch.cat([torch.cat([stats.gram, stats.sum_x[:, None]], 1),
                          torch.cat([stats.sum_x[None, :], n], 1)])
        rhs = torch.cat([stats.cross, stats.sum_y[None, :]])
        prior = torch.cat([w_old.T, torch.zeros_like(b_old)[None, :]])
        penalty = torch.ones(d_in + 1, dtype=torch.float64, device=stats.gram.device)
        penalty[-1] = 0.0
    else:
        gram = stats.gram
        rhs = stats.cross - stats.sum_x[:, None] * b_old[None, :]
        prior = w_old.T
        penalty = torch.ones(d_in, dtype=torch.float64, device=stats.gram.device)
    theta = _solve(gram + torch.diag(lam * penalty), rhs + lam * penalty[:, None] * prior)
    return (theta[:d_in].T.contiguous(), theta[d_in].clone()) if fit_bias else (theta.T.contiguous(), b_old.clone())


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a x = b for symmetric positive (semi-)definite a: Cholesky, or the least-squares solution when a is singular."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    return torch.linalg.lstsq(a, b, driver="gelsd" if a.device.type == "cpu" else None).solution


def candidates(stats: LinearStats, weight: torch.Tensor, bias: torch.Tensor, rules: tuple[str, ...],
               dampings: tuple[float, ...], fit_bias: bool) -> list[Fit]:
    """Every candidate of the allowed `rules` fitted on `stats`; "unchanged" is always among them."""
    out = [Fit("unchanged", None, weight.to(stats.gram), bias.to(stats.gram))]
    if "bias" in rules and fit_bias:
        out.append(Fit("bias", None, weight.to(stats.gram), bias_only(stats, weight)))
    if "lstsq" in rules:
        out += [Fit("lstsq", d, *lstsq(stats, weight, bias, d, fit_bias)) for d in dampings]
    return out
