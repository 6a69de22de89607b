"""The statistics a transfer rests on: linear maps between two models' activations on the same tokens,
how well they fit, and which layers correspond (docs/methods.md, section 8).

A `Pair` holds one site's paired activations, OLD's X [n, p] and NEW's Y [n, q], as Gram matrices,
so memory depends on the widths and never on the number of tokens. Both directions come from them by
ridge least squares, with no intercept (what a module reads or writes includes the mean):

    old -> new   S = (X^T X + lam I)^-1 X^T Y      X S ~ Y   (what OLD writes, in NEW's coordinates)
    new -> old   R = (Y^T Y + lam I)^-1 Y^T X      Y R ~ X   (what NEW offers, as OLD's readers saw it)

`lam` is the posterior-mean ridge of a prior that expects the map to carry OLD's variance onto NEW's:
noise variance over prior variance, `lam = (RSS / tr(Y^T Y)) * tr(X^T X) / n`, with RSS the residual of
a first, barely regularised solve (`ridge` times the mean eigenvalue). Two models that are one in
different coordinates leave no residual, so lam is ~0 and the maps exact; between unrelated models the
share left unexplained sets how far directions the text rarely visits are shrunk towards 0. Those are
the directions a task's weights may write into, and a map fitted to predict OLD's own activations is
free to amplify them a hundredfold there at no cost to its fit (Hoerl-Kennard's estimate, which
divides by that map's norm, shrinks least exactly when it should most).
"""

from __future__ import annotations

from functools import cached_property

import torch

TINY = torch.finfo(torch.float64).tiny


class Pair:
    def __init__(self, ridge: float):
        self.ridge = ridge
        self.n = 0
        self.xx = self.yy = self.xy = self.sx = self.sy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Another batch of paired rows (any leading shape; the last axis is the site's width)."""
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).to(x.device, torch.float64)
        if self.xx is None:
            self.xx, self.yy, self.xy = x.T @ x, y.T @ y, x.T @ y
            self.sx, self.sy = x.sum(0), y.sum(0)
        else:
            self.xx += x.T @ x
            self.yy += y.T @ y
            self.xy += x.T @ y
            self.sx += x.sum(0)
            self.sy += y.sum(0)
        self.n += len(x)

    def cpu(self) -> Pair:
        """Its statistics on the CPU, beside the module tensors they will carry."""
        for name in ("xx", "yy", "xy", "sx", "sy"):
            setattr(self, name, getattr(self, name).cpu())
        return self

    @property
    def widths(self) -> tuple[int, int]:
        return self.xy.shape

    @cached_property
    def forward(self) -> torch.Tensor:
        """S [p, q]: OLD's coordinates -> NEW's."""
        return _solve(self.xx, self.xy, self.yy.trace(), self.n, self.ridge)

    @cached_property
    def backward(self) -> torch.Tensor:
        """R [q, p]: NEW's coordinates -> OLD's."""
        return _solve(self.yy, self.xy.T, self.xx.trace(), self.n, self.ridge)

    @cached_property
    def r2_forward(self) -> float:
        return _r2(self.xx, self.xy, self.yy, self.sy, self.n, self.forward)

    @cached_property
    def r2_backward(self) -> float:
        return _r2(self.yy, self.xy.T, self.xx, self.sx, self.n, self.backward)

    def scale(self, change: torch.Tensor) -> torch.Tensor:
        """A per-feature scaling of OLD's activations (1 + change) as the closest per-feature scaling of
        NEW's: with z = (X * change) S, each NEW feature j minimises sum_t (Y[t,j] c_j - z[t,j])^2, so
        c_j = sum_k change_k S[k,j] (X^T Y)[k,j] / (Y^T Y)[j,j]. Fitting the change keeps 1 at 1."""
        num = (change.double().to(self.xy.device)[:, None] * self.forward * self.xy).sum(0)
        return num / self.yy.diagonal().clamp_min(TINY)


def _solve(gram: torch.Tensor, cross: torch.Tensor, target: torch.Tensor, n: int, ridge: float) -> torch.Tensor:
    """argmin_M ||Y - X M||^2 + lam ||M||^2 from X^T X (`gram`), X^T Y (`cross`) and tr(Y^T Y) (`target`)."""
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    floor = ridge * gram.diagonal().mean().clamp_min(TINY)
    m = torch.linalg.solve(gram + floor * eye, cross)
    rss = (target - 2 * (m * cross).sum() + (m * (gram @ m)).sum()).clamp_min(0)
    lam = rss / target.clamp_min(TINY) * gram.trace() / n
    return m if lam <= floor else torch.linalg.solve(gram + lam * eye, cross)


def _r2(xx, xy, yy, sy, n, m) -> float:
    """1 - ||Y - X M||^2 / ||Y - mean(Y)||^2, from the Gram matrices alone."""
    residual = yy.trace() - 2 * (m * xy).sum() + (m * (xx @ m)).sum()
    total = yy.trace() - sy.square().sum() / n
    return float(1 - residual / total.clamp_min(TINY))


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two activations on the same rows: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),
    rows centred. 1 for representations equal up to a rotation and a scale."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300))


def monotone(score: list[list[float]]) -> list[int]:
    """For every NEW layer j an OLD layer a(j), non-decreasing in j, maximising sum_j score[j][a(j)]
    (dynamic programming over (j, a); ties go to the lower OLD layer)."""
    best = list(score[0])
    back = []
    for row in score[1:]:
        arg, run = [], 0
        for a in range(len(best)):  # the best predecessor a' <= a
            run = a if best[a] > best[run] else run
            arg.append(run)
        back.append(arg)
        best = [row[a] + best[arg[a]] for a in range(len(row))]
    a = max(range(len(best)), key=lambda i: (best[i], -i))
    out = [a]
    for arg in reversed(back):
        a = arg[a]
        out.append(a)
    return out[::-1]
