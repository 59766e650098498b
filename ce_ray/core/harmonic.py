"""The harmonic fill of any batch of holes on the training device: a multigrid Laplace solver.

Not in the paper. `mask.fill=diffusion` shows the generator the harmonic (membrane) fill of its
hole: hole pixels solve Laplace's equation, with the known pixels around them as boundary values
and no flux across the image border; the same equation `masks.harmonic_fill_exact` solves with a
sparse factorisation per hole on the host. A training batch holds 64 different holes every step,
so this module solves them all at once with tensor ops on the images' device: no host round trip,
no per-image Python.

Method (Briggs, Henson & McCormick, "A Multigrid Tutorial", ch. 3-4):
1. Start from full multigrid: the known pixels averaged down a 2x pyramid, the coarsest problem
   solved, then one V-cycle per level from coarse to fine, each starting from the level below.
2. Correction-scheme V-cycles on the residual of the 5-point Laplacian: red-black Gauss-Seidel
   smoothing, restriction by summing 2x2 blocks, bilinear prolongation of the correction, applied
   to hole pixels only.
3. Conjugate gradients preconditioned by that V-cycle, a fixed number of iterations (training: no
   device-to-host synchronisation), or until every image's largest residual is below `tol`.

A pixel on the image border counts itself for each missing neighbour, which is exactly the no-flux
condition: the update u = mean of 4 neighbours then solves deg(p) u_p = sum of the deg(p)
in-image neighbours, the exact solver's equation.

Written for CPU speed as much as GPU: every full-size operation is an in-place add / multiply on
preallocated buffers (a fresh 12 MB tensor per op costs more than the op on a CPU), masks are float
multipliers (a broadcast boolean `where` ran ~15x slower than a multiply here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COARSEST = 4  # px: levels stop when the shorter side would drop below this
PRE_SMOOTH, POST_SMOOTH = 1, 1  # red-black Gauss-Seidel sweeps around each coarse correction
COARSE_SWEEPS = 8  # sweeps on the coarsest level (a handful of pixels: cheap)
# A coarse cell is unknown when at least this many of its 4 fine pixels are (see _coarser).
COARSE_UNKNOWN = 4
# Accuracy the fill is solved to, in [-1, 1] units, on the largest residual of the equation
# (4 u_p - sum of neighbours).
DEFAULT_TOL = 1e-3
DEFAULT_MAX_CYCLES = 20


def _neighbour_sum(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sum of the 4 neighbours of u, a border pixel counting itself for each missing one
    (no flux). u, out: (B, C, H, W), H and W >= 2."""
    out[..., 1:, :] = u[..., :-1, :]
    out[..., :1, :] = u[..., :1, :]
    out[..., :-1, :] += u[..., 1:, :]
    out[..., -1:, :] += u[..., -1:, :]
    out[..., :, 1:] += u[..., :, :-1]
    out[..., :, :1] += u[..., :, :1]
    out[..., :, :-1] += u[..., :, 1:]
    out[..., :, -1:] += u[..., :, -1:]
    return out


class _Level:
    """One grid of the hierarchy: where the unknowns are (float masks, split red / black) and the
    scratch buffers its sweeps reuse."""

    def __init__(self, hole: torch.Tensor, channels: int, dtype: torch.dtype):
        b, _, h, w = hole.shape
        self.hole = hole  # (B, 1, h, w) bool
        y = torch.arange(h, device=hole.device)[:, None]
        x = torch.arange(w, device=hole.device)[None, :]
        red = ((y + x) % 2 == 0)[None, None]
        shape = (b, channels, h, w)
        # Expanded to all channels once: a broadcast multiply over the channel axis is slower.
        self.m = hole.to(dtype).expand(shape).contiguous()
        self.m_red = (hole & red).to(dtype).expand(shape).contiguous()
        self.m_black = self.m - self.m_red
        self.s = torch.empty(shape, dtype=dtype, device=hole.device)

    def smooth(self, u: torch.Tensor, rhs: torch.Tensor | None, sweeps: int, reverse: bool = False) -> torch.Tensor:
        """Red-black Gauss-Seidel on 4 u - sum(neighbours) = rhs at hole pixels, in place (black
        first when `reverse`: post-smoothing mirrors pre-smoothing, so a V-cycle is a symmetric
        preconditioner)."""
        s = self.s
        colours = (self.m_black, self.m_red) if reverse else (self.m_red, self.m_black)
        for _ in range(sweeps):
            for m in colours:
                _neighbour_sum(u, s)
                if rhs is not None:
                    s += rhs
                s.mul_(0.25).sub_(u).mul_(m)  # (new - u) on this colour's hole pixels, 0 elsewhere
                u += s
        return u

    def residual(self, u: torch.Tensor, rhs: torch.Tensor | None) -> torch.Tensor:
        """rhs - (4 u - sum of neighbours) at hole pixels, 0 elsewhere (in the scratch buffer)."""
        r = _neighbour_sum(u, self.s)
        r.sub_(u, alpha=4.0)
        if rhs is not None:
            r += rhs
        return r.mul_(self.m)


def _coarser(hole: torch.Tensor) -> torch.Tensor:
    """A coarse cell is unknown when at least COARSE_UNKNOWN of its 2x2 fine pixels are (odd
    sides: the last row / column pairs with a copy of itself). With "any" (1), a 1-px stroke
    became a 2-px-wide coarse hole whose correction overshot the fine one and the cycles diverged;
    with more, thin holes live on the fine levels, where smoothing alone converges fast."""
    h, w = hole.shape[-2:]
    x = F.pad(hole.to(torch.float32), (0, w % 2, 0, h % 2), mode="replicate")
    return F.avg_pool2d(x, 2) * 4 >= COARSE_UNKNOWN - 0.5


def _restrict_sum(r: torch.Tensor) -> torch.Tensor:
    """Sum over 2x2 blocks: the coarse right-hand side (a coarse cell is 2h wide, and the 5-point
    operator carries h^2, so the coarse equation's source is 4x the block mean)."""
    h, w = r.shape[-2:]
    if h % 2 or w % 2:
        r = F.pad(r, (0, w % 2, 0, h % 2))  # zero: padded cells carry no residual
    return F.avg_pool2d(r, 2).mul_(4.0)


def _prolong(e: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    up = F.interpolate(e, scale_factor=2, mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]


def _levels(hole: torch.Tensor, channels: int, dtype: torch.dtype) -> list[_Level]:
    out = [_Level(hole, channels, dtype)]
    while min(out[-1].hole.shape[-2:]) >= 2 * COARSEST:
        out.append(_Level(_coarser(out[-1].hole), channels, dtype))
    return out


def _v_cycle(levels: list[_Level], i: int, u: torch.Tensor, rhs: torch.Tensor | None) -> torch.Tensor:
    lvl = levels[i]
    if i == len(levels) - 1:
        return lvl.smooth(u, rhs, COARSE_SWEEPS)
    lvl.smooth(u, rhs, PRE_SMOOTH)
    r = _restrict_sum(lvl.residual(u, rhs))
    e = _v_cycle(levels, i + 1, torch.zeros_like(r), r)
    up = _prolong(e, u.shape[-2:])
    u.addcmul_(up, lvl.m)  # the correction on hole pixels only
    return lvl.smooth(u, rhs, POST_SMOOTH, reverse=True)


def _restrict_known(u: torch.Tensor, fine: _Level, coarse: _Level) -> torch.Tensor:
    """The coarse problem's image: each coarse cell the mean of its known fine pixels (its value
    when it is a boundary cell), hole cells 0 until the solver fills them."""
    known = 1.0 - fine.m[:, :1]
    h, w = u.shape[-2:]
    pad = (0, w % 2, 0, h % 2)
    num = F.avg_pool2d(F.pad(u * known, pad), 2)
    den = F.avg_pool2d(F.pad(known, pad), 2).clamp_min(1e-12)
    return (num / den).mul_(1.0 - coarse.m)


def full_multigrid(x: torch.Tensor, levels: list[_Level]) -> torch.Tensor:
    """FMG start: solve the coarsest problem, then at each finer level start from the coarser
    solution (bilinear) and run one V-cycle. x: the finest image with known pixels in place."""
    images = [x]
    for fine, coarse in zip(levels[:-1], levels[1:]):
        images.append(_restrict_known(images[-1], fine, coarse))
    u = levels[-1].smooth(images[-1].clone(), None, COARSE_SWEEPS * 4)
    for i in range(len(levels) - 2, -1, -1):
        up = _prolong(u, images[i].shape[-2:])
        u = images[i].addcmul(up - images[i], levels[i].m)  # known pixels from the image, the hole from below
        u = _v_cycle(levels, i, u, None)
    return u


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1): one system per image and channel


def _pcg(u: torch.Tensor, levels: list[_Level], tol: float | None, max_iters: int) -> torch.Tensor:
    """Conjugate gradients on the hole's Laplacian, preconditioned by one V-cycle (a symmetric
    one: post-smoothing mirrors pre-smoothing). Plain V-cycles stall on holes the coarse grids
    cannot see (strokes a few pixels wide and long); CG removes those slow modes in a few steps.
    `tol` None: exactly `max_iters` iterations, never reading a value back to the host."""
    fine = levels[0]
    r = fine.residual(u, None).clone()  # the scratch buffer is reused by the V-cycles
    p: torch.Tensor | None = None
    rz_old = torch.ones(())
    for _ in range(max_iters):
        if tol is not None and float(r.abs().amax()) <= tol:
            break
        z = _v_cycle(levels, 0, torch.zeros_like(r), r)
        rz = _dot(r, z)
        p = z if p is None else z + (rz / rz_old.clamp_min(1e-30)) * p
        rz_old = rz
        ap = (
            _neighbour_sum(p, torch.empty_like(p)).sub_(p, alpha=4.0).neg_().mul_(fine.m)
        )  # A p = (4 p - sum) on the hole
        alpha = rz / _dot(p, ap).clamp_min(1e-30)
        u = u + alpha * p
        r = r - alpha * ap
    return u


@torch.no_grad()
def harmonic_fill(
    images: torch.Tensor,
    hole: torch.Tensor,
    *,
    cycles: int | None = None,
    tol: float = DEFAULT_TOL,
    max_cycles: int = DEFAULT_MAX_CYCLES,
) -> torch.Tensor:
    """The harmonic fill of each image's hole, on the images' device. images: (B, C, H, W) float;
    hole: (B, 1, H, W) or (H, W), bool or {0, 1}. Known pixels are returned unchanged; an image
    with no known pixel comes back as it went in (the caller decides what fills it). Solved in
    float32, from a full-multigrid start: then exactly `cycles` preconditioned CG iterations when
    given (no device-to-host synchronisation: the training step), else iterations until the
    largest residual is <= `tol` (within 1/255 of the exact fill), at most `max_cycles`."""
    h = hole.to(device=images.device, dtype=torch.bool)
    if h.dim() == 2:
        h = h[None, None]
    h = h.expand(images.shape[0], 1, *images.shape[-2:])
    if images.shape[0] == 0 or min(images.shape[-2:]) < 2:
        return images.clone()
    x = images.float()
    levels = _levels(h, x.shape[1], x.dtype)
    u = full_multigrid(x, levels)
    u = _pcg(u, levels, None, cycles) if cycles is not None else _pcg(u, levels, tol, max_cycles)
    has_context = (~h).flatten(1).any(dim=1)[:, None, None, None]
    u = torch.where(has_context, u, x)
    return u.to(images.dtype)
