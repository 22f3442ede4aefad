"""Random directions for the zeroth-order family, regenerated from a seed one chunk at a time.

A ZO step touches every trainable weight three or four times (probe, undo, probe, update) with the same
direction z, so z must be cheap to regenerate and must never exist whole (peak memory must stay that of
inference). Each sampler splits every parameter into fixed chunks and returns d = μ·z for one chunk on
demand, plus a scalar multiplier; the same (seed, parameter, chunk) always gives the same values.

* ``PoolDirections`` (default for SPSA-type estimators). Per seed, one pool of 2^22 Gaussian (or ±1)
  numbers is drawn; chunk k of the flattened parameters is the pool window at a seeded random offset,
  times a seeded random sign. Drawing z is then a 16 MB draw plus views, instead of a draw as large as
  the model, which on CPU took longer than the forwards themselves. What SPSA needs is kept exactly:
  every z_i is N(0, 1) (or ±1), and E[z zᵀ] = I — two entries of one chunk are distinct pool entries,
  and entries of two chunks carry independent random signs. Higher moments are *not* those of an i.i.d.
  vector (one pool entry feeds about n / 2^22 coordinates), so estimators that need fourth moments
  (HiZOO's Hessian estimate) use ``IIDDirections``.
* ``IIDDirections``: every chunk drawn i.i.d. from its own seeded generator.
* ``LowRankDirections``: for 2-D weights W (m × n), d = μ·√(mn)/r · U Z Vᵀ with U (m × r), V (n × r)
  Haar-orthonormal, refreshed every ``refresh`` steps, and a fresh Z (r × r) per seed; entries then have
  unit variance like a Gaussian z, and the estimate lives in the span of U, V. Other tensors use a pool.
* ``SubspaceDirections`` (ZO-Muon): for 2-D weights d = μ·√(m/r) · P Z with P (m × r) Haar-orthonormal,
  refreshed every ``refresh`` steps, and Z (r × n) per seed.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from unlearn.core.settings import check_int

POOL_SIZE = 1 << 22
CHUNK = 1 << 18  # elements (or about that many, as whole rows) per chunk: large enough to amortize the
# per-chunk Python overhead (a pass over the 135M model takes ~28 ms at 2^18, ~38 ms at 2^16)
KINDS = ("gaussian", "rademacher", "sphere")
_GOLDEN = 0x9E3779B97F4A7C15


def mix(*values: int) -> int:
    """A 63-bit seed from several integers (seed, parameter, chunk, ...), so streams never collide."""
    out = 0
    for v in values:
        out = (out * _GOLDEN + v + 1) % (1 << 63)
    return out


def flat_chunks(numel: int, row: int = 1) -> list[tuple[int, int]]:
    """[start, end) ranges covering ``numel`` elements, aligned to whole rows of ``row`` elements."""
    step = max(row, (CHUNK // row) * row)
    return [(a, min(a + step, numel)) for a in range(0, numel, step)]


class Directions(Protocol):
    chunks: list[list[tuple[int, int]]]  # per parameter, its flat chunk ranges

    def prepare(self, seeds: list[int], step: int) -> None:
        """Make the directions of ``seeds`` available (called once per optimizer step)."""

    def direction(self, seed: int, index: int, chunk: int) -> tuple[torch.Tensor, float]:
        """(d, m): d·m is μ·z for that chunk of parameter ``index``, flat."""


def _haar(rows: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A rows × rank matrix with orthonormal columns, uniformly (Haar) distributed."""
    q, r = torch.linalg.qr(torch.randn(rows, rank, generator=gen))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix makes QR's output Haar


class PoolDirections:
    views = True  # every direction is a window of one drawn pool: batching chunks costs no memory

    def __init__(self, params: list[torch.Tensor], mu: float, kind: str = "gaussian") -> None:
        if kind not in KINDS:
            raise ValueError(f"direction must be one of {', '.join(KINDS)}, got '{kind}'")
        self.mu, self.kind = mu, kind
        self.chunks = [flat_chunks(p.numel()) for p in params]
        # A pool never larger than the model (rounded up to a power of two, at least one chunk), so tiny
        # adapters do not pay for drawing 2^22 numbers; every chunk still fits in the pool, which is what
        # keeps two entries of one chunk distinct pool entries.
        self.pool_size = min(POOL_SIZE, 1 << max(sum(p.numel() for p in params) - 1, 1).bit_length())
        self._first = [0]
        for c in self.chunks:
            self._first.append(self._first[-1] + len(c))
        self._lengths = torch.tensor([b - a for c in self.chunks for a, b in c])
        self._dim = sum(p.numel() for p in params)
        self._device = params[0].device if params else torch.device("cpu")
        self._cache: dict[int, tuple[torch.Tensor, list[int], list[float]]] = {}

    def prepare(self, seeds: list[int], step: int) -> None:
        self._cache = {s: self._cache[s] if s in self._cache else self._draw(s) for s in seeds}

    def _draw(self, seed: int) -> tuple[torch.Tensor, list[int], list[float]]:
        gen = torch.Generator().manual_seed(seed)
        size = self.pool_size
        tail = min(CHUNK, size)
        # On a GPU the pool is drawn there, by a generator on that device (seeded from the same seed, so every
        # process of a seed-sharing run draws the same pool); on the CPU by the CPU generator that also draws the
        # offsets and signs below.
        on_gpu = self._device.type == "cuda"
        pool_gen = torch.Generator(device=self._device).manual_seed(mix(seed, 1)) if on_gpu else gen
        pool = torch.empty(size + tail, device=self._device)  # + tail: a window may start anywhere, contiguous
        head = pool[:size]
        if self.kind == "rademacher":
            head.bernoulli_(0.5, generator=pool_gen).mul_(2 * self.mu).sub_(self.mu)
        else:
            # μz rounded to 8 significant bits: adding and then subtracting such a d restores θ exactly far
            # more often than a full-precision d does (see zo.py on restoring).
            head.normal_(generator=pool_gen).mul_(self.mu)
            head.copy_(head.bfloat16())
        pool[size:].copy_(pool[:tail])
        n = len(self._lengths)
        offsets = torch.randint(0, size, (n,), generator=gen)
        signs = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
        if self.kind == "sphere":  # z = √n · g / ‖g‖; ‖g‖² from prefix sums of the pool, no pass needed
            sq = torch.cat([torch.zeros(1, dtype=torch.float64), pool.double().pow(2).cumsum(0).cpu()])
            norm = (sq[offsets + self._lengths] - sq[offsets]).sum().sqrt()
            signs = signs * float(self.mu * math.sqrt(self._dim) / norm)
        return pool, offsets.tolist(), signs.tolist()

    def direction(self, seed: int, index: int, chunk: int) -> tuple[torch.Tensor, float]:
        pool, offsets, signs = self._cache[seed]
        a, b = self.chunks[index][chunk]
        k = self._first[index] + chunk
        return pool[offsets[k]: offsets[k] + b - a], signs[k]


class ParameterDirections:
    """MeZO's way: each parameter's whole direction drawn at once on its device, by a generator on that device
    seeded with (seed, parameter), then coarsened like the pool's (8 significant bits). One chunk per parameter,
    one launch per parameter per pass, a parameter-sized temporary; drawn again at each pass (probe, probe,
    update), never stored. Entries are i.i.d."""

    views = False

    def __init__(self, params: list[torch.Tensor], mu: float, kind: str = "gaussian") -> None:
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"draw 'parameter' takes gaussian or rademacher directions, got '{kind}'")
        self.mu, self.kind = mu, kind
        self.chunks = [[(0, p.numel())] for p in params]
        self._devices = [p.device for p in params]
        self._gens: dict[torch.device, torch.Generator] = {}

    def prepare(self, seeds: list[int], step: int) -> None:
        pass

    def direction(self, seed: int, index: int, chunk: int) -> tuple[torch.Tensor, float]:
        device = self._devices[index]
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        gen.manual_seed(mix(seed, index))
        z = torch.empty(self.chunks[index][0][1], device=device)
        if self.kind == "rademacher":
            return z.bernoulli_(0.5, generator=gen).mul_(2 * self.mu).sub_(self.mu), 1.0
        z.normal_(generator=gen).mul_(self.mu)
        return z.copy_(z.bfloat16()), 1.0  # coarse, as the pool's: θ + d − d restores exactly more often


class IIDDirections:
    """Every chunk drawn from its own generator seeded by (seed, parameter, chunk): i.i.d. entries."""

    def __init__(self, params: list[torch.Tensor], mu: float, kind: str = "gaussian") -> None:
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"i.i.d. directions are gaussian or rademacher, got '{kind}'")
        self.mu, self.kind = mu, kind
        self.chunks = [flat_chunks(p.numel()) for p in params]
        self._devices = [p.device for p in params]
        self._gen = torch.Generator()

    def prepare(self, seeds: list[int], step: int) -> None:
        pass

    def direction(self, seed: int, index: int, chunk: int) -> tuple[torch.Tensor, float]:
        a, b = self.chunks[index][chunk]
        self._gen.manual_seed(mix(seed, index, chunk))
        if self.kind == "rademacher":
            z = torch.randint(0, 2, (b - a,), generator=self._gen).float().mul_(2).sub_(1)
        else:
            z = torch.randn(b - a, generator=self._gen)
        return z.mul_(self.mu).to(self._devices[index]), 1.0


class _MatrixDirections:
    """Shared by the low-rank and subspace samplers: structured d for 2-D weights, a pool elsewhere."""

    def __init__(self, params: list[torch.Tensor], mu: float, rank: int, refresh: int, seed: int) -> None:
        check_int("rank", rank)
        check_int("refresh", refresh)
        self.mu, self.rank, self.refresh, self.seed = mu, rank, refresh, seed
        self.params = params
        self.matrix = [p.dim() == 2 and min(p.shape) > rank for p in params]
        self.pool = PoolDirections(params, mu)
        self.chunks = [flat_chunks(p.numel(), p.shape[1]) if m else c
                       for p, m, c in zip(params, self.matrix, self.pool.chunks, strict=True)]
        self.bases: dict[int, tuple[torch.Tensor, ...]] = {}
        self._epoch = -1
        self._factors: dict[int, dict[int, torch.Tensor]] = {}

    def prepare(self, seeds: list[int], step: int) -> None:
        epoch = step // self.refresh
        if epoch != self._epoch:  # lazy refresh: new subspaces only every `refresh` steps
            self._epoch = epoch
            self.bases = {i: self._basis(p, mix(self.seed, epoch, i))
                          for i, (p, m) in enumerate(zip(self.params, self.matrix, strict=True)) if m}
        self.pool.prepare(seeds, step)
        self._factors = {s: self._factors[s] if s in self._factors else
                         {i: self._factor(i, mix(s, i)) for i in self.bases} for s in seeds}

    def _basis(self, p: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _factor(self, index: int, seed: int) -> torch.Tensor:
        """The seed's small random matrix for parameter ``index``, already scaled to give d."""
        raise NotImplementedError

    def factor(self, seed: int, index: int) -> torch.Tensor:
        """The seed's small matrix for matrix parameter ``index`` (d = basis @ factor, row block by row block)."""
        return self._factors[seed][index]

    def direction(self, seed: int, index: int, chunk: int) -> tuple[torch.Tensor, float]:
        if not self.matrix[index]:
            return self.pool.direction(seed, index, chunk)
        a, b = self.chunks[index][chunk]
        cols = self.params[index].shape[1]
        left = self.bases[index][0][a // cols: b // cols]
        return (left @ self.factor(seed, index)).view(-1), 1.0


class LowRankDirections(_MatrixDirections):
    def _basis(self, p: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return _haar(p.shape[0], self.rank, gen).to(p), _haar(p.shape[1], self.rank, gen).to(p)

    def _factor(self, index: int, seed: int) -> torch.Tensor:
        m, n = self.params[index].shape
        z = torch.randn(self.rank, self.rank, generator=torch.Generator().manual_seed(seed)).to(self.params[index])
        return (self.mu * math.sqrt(m * n) / self.rank) * (z @ self.bases[index][1].T)  # r × n: Z Vᵀ, scaled


class SubspaceDirections(_MatrixDirections):
    def _basis(self, p: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        return (_haar(p.shape[0], self.rank, torch.Generator().manual_seed(seed)).to(p),)

    def _factor(self, index: int, seed: int) -> torch.Tensor:
        m, n = self.params[index].shape
        z = torch.randn(self.rank, n, generator=torch.Generator().manual_seed(seed)).to(self.params[index])
        return self.mu * math.sqrt(m / self.rank) * z  # r × n
