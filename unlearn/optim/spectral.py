"""Spectral grade: orthogonalized (Muon) updates for hidden matrices, and SIFT-style conflict control.

* ``muon``: ``torch.optim.Muon`` on the 2-D hidden matrices, ``torch.optim.AdamW`` on everything else
  (embeddings, the output head, norms, biases), both fed by one backward pass.
* ``sift``: for the selected matrices, one momentum per side (forget / retain). Where the two momenta
  point against each other (cosine below ``threshold``) the update is built from the top-k singular
  vectors of both, orthogonalized together, so each side moves along its own main directions at equal
  strength and neither is cancelled by the other; otherwise it is Muon on their sum. Everything else: AdamW
  on the total gradient.

Both scale the orthogonal update by ``lr·√max(1, rows/cols)``, as torch.optim.Muon's default ("original")
does, so ``lr`` means the same thing in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from unlearn.core.settings import AT_LEAST_ONE, NON_NEGATIVE, UNIT_OPEN, Limit, setting
from unlearn.optim.loss import loss_parts, total_loss
from unlearn.optim.protocol import (
    OPTIMIZERS,
    BackwardStep,
    Closure,
    ModelDependent,
    compile_pattern,
    read_settings,
    require_closure,
    sharded,
)

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic: maximal slope at 0 in 5 steps

# Llama/Mistral/Qwen/OPT name their input embeddings ``embed_tokens`` (NeoX ``embed_in``/``embed_out``,
# Falcon/BLOOM ``word_embeddings``), GPT-2 ``wte``/``wpe``, Meta's original Llama checkpoints the head
# ``output``. The head is anchored at the end of the name so that hidden matrices such as BERT's
# ``attention.output.dense.weight`` stay with Muon.
MUON_EXCLUDE = r"embed|lm_head|(^|\.)(wte|wpe|output)\.weight$"

# The attention and MLP projections of the Llama family (incl. fused ``qkv_proj``/``gate_up_proj``) and of
# GPT-2 (``c_attn``, ``c_proj``, ``c_fc``). Matched anywhere in the name, so the LoRA matrices of these
# modules (``...q_proj.lora_A.default.weight``) are selected too.
SIFT_PATTERN = r"\.(q|k|v|o|qkv|gate|up|down|gate_up)_proj\b|\.(c_attn|c_proj|c_fc)\b"

EXACT_SVD_MAX = 256  # min(rows, cols) up to which the top-k come from a full thin SVD
OVERSAMPLE = 8  # extra columns in the randomized sketch beyond k
SKETCH_SEED = 0  # the sketch is seeded on its own so it neither reads nor advances the global RNG stream


def newton_schulz(
    matrix: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate orthogonalization U·S'·Vᵀ of ``matrix`` = U·S·Vᵀ, computed in float32.

    Muon's quintic Newton–Schulz iteration X ← aX + (bXXᵀ + c(XXᵀ)²)X after scaling X to Frobenius norm 1
    (so every singular value is ≤ 1). The coefficients trade exact convergence for speed: S' lands
    around [0.68, 1.13] for a random Gaussian matrix rather than on 1 (singular values far below the largest
    stay smaller), which does not hurt as an update direction. Returns float32
    whatever the input dtype (bf16 would make results depend on the device); the caller casts.
    """
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    x = matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix XXᵀ is then the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # out of place: .float() may return the caller's own tensor
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """Exact orthogonal polar factor P·Qᵀ of a tall matrix P·Σ·Qᵀ (thin SVD)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


@contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the default generator of ``device`` for the block and restore it afterwards: the sketch is
    then reproducible (a resumed run takes the same steps) and the run's own random stream is untouched."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:  # other accelerators: reproducible only through the global seed
        yield


def top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k, V_k): the top-``k`` left and right singular vectors of a float32 ``matrix``.

    Exact (thin SVD) while min(rows, cols) ≤ 256. Above that a randomized SVD with k + 8 columns and two
    power iterations: still exact when the matrix has rank ≤ k (a momentum built from a few low-rank
    gradients), close to the exact vectors otherwise, and far cheaper than a full SVD of a 4096×11008
    matrix.
    """
    if min(matrix.shape) <= EXACT_SVD_MAX:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], vh[:k].T
    with _seeded_rng(matrix.device, SKETCH_SEED):
        u, _, v = torch.svd_lowrank(matrix, q=min(k + OVERSAMPLE, min(matrix.shape)), niter=2)
    return u[:, :k], v[:, :k]


def sift_direction(forget: torch.Tensor, retain: torch.Tensor, k: int) -> torch.Tensor:
    """O = polar([U_r, U_f])·polar([V_r, V_f])ᵀ from the top-``k`` singular vectors of each momentum.

    Orthogonalizing the joint bases gives both sides' main directions singular value 1 in the update, so a
    larger retain momentum cannot drown the forget directions (nor the reverse) as it would in their sum.
    Invariant to the sign ambiguity of the SVD: flipping a column of U together with the matching column
    of V (U→UD, V→VD, D = diag(±1)) gives polar(UD) = polar(U)·D, and the D's cancel.
    """
    u_f, v_f = top_singular(forget, k)
    u_r, v_r = top_singular(retain, k)
    return _polar(torch.cat([u_r, u_f], dim=1)) @ _polar(torch.cat([v_r, v_f], dim=1)).T


def _split_item(item: Any) -> tuple[str | None, torch.Tensor]:
    if isinstance(item, tuple):
        return item[0], item[1]
    return None, item


class _Composite(torch.optim.Optimizer):
    """Sub-optimizers over disjoint parameters, seen from outside as one optimizer.

    ``param_groups`` are the sub-optimizers' own group dicts, so a logger reading ``param_groups[0]["lr"]``
    or a scheduler changing it sees the real learning rate; this object keeps no state of its own.
    """

    def __init__(self, params: list[Any], parts: dict[str, torch.optim.Optimizer]) -> None:
        super().__init__(params, {})
        self.parts = parts
        self._link_groups()

    def _link_groups(self) -> None:
        # Re-run after loading: torch's load_state_dict replaces each sub-optimizer's group dicts.
        self.param_groups = [group for opt in self.parts.values() for group in opt.param_groups]

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> None:  # type: ignore[override]
        """The update alone, from the gradients already in ``.grad`` (``BackwardStep`` fills them)."""
        for opt in self.parts.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != set(self.parts):  # e.g. a checkpoint from a different exclude/pattern
            raise ValueError(f"state_dict has parts {sorted(state_dict)}, this optimizer {sorted(self.parts)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])
        self._link_groups()


def _adamw(items: list[Any], lr: float, betas: Iterable[float], weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(items, lr=lr, betas=tuple(betas), weight_decay=weight_decay)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SpectralSettings:
    """What Muon and SIFT share: the orthogonal update's rate and momentum, and the AdamW side's settings."""

    lr: float = setting(5e-4, limit=NON_NEGATIVE)
    momentum: float = setting(0.95, limit=UNIT_OPEN)
    weight_decay: float = setting(0.0, limit=NON_NEGATIVE)
    adamw_lr: float = setting(1e-5, limit=NON_NEGATIVE)
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_weight_decay: float = setting(0.0, limit=NON_NEGATIVE)


@OPTIMIZERS.register("muon")
class Muon(BackwardStep, _Composite):
    """torch.optim.Muon on the hidden matrices, torch.optim.AdamW on every other parameter.

    Hidden: 2-D and the name does not match ``exclude`` (embeddings and the output head are 2-D too, but
    Muon is not meant for them). Parameters given without names cannot be told apart, so every 2-D one
    goes to Muon. ``lr`` is Muon's (reported first in ``param_groups``), ``adamw_lr`` the other group's.
    Defaults are unlearning-scale: pretraining recipes pair lr 0.02 with AdamW 3e-4, but unlearning nudges a
    trained model; an orthogonal update at lr 5e-4 moves an entry of a 576×1536 matrix by about
    5e-4/√1536 ≈ 1.3e-5, comparable to the AdamW side at 1e-5.
    """

    grade = "spectral"

    @dataclass(frozen=True)
    class Settings(SpectralSettings):
        nesterov: bool = True
        ns_steps: int = setting(5, limit=AT_LEAST_ONE)
        exclude: str = MUON_EXCLUDE

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        excluded = compile_pattern("exclude", s.exclude)
        items = list(params)
        hidden, other = [], []
        for item in items:
            name, p = _split_item(item)
            is_hidden = p.ndim == 2 and (name is None or not excluded.search(name))
            (hidden if is_hidden else other).append(item)
        parts: dict[str, torch.optim.Optimizer] = {}
        if hidden:  # torch.optim.Muon rejects an empty list; a model may have no hidden matrix trainable
            parts["muon"] = torch.optim.Muon(hidden, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum,
                                             nesterov=s.nesterov, ns_steps=s.ns_steps)
        if other:
            parts["adamw"] = _adamw(other, s.adamw_lr, s.adamw_betas, s.adamw_weight_decay)
        super().__init__(items, parts)


class _ConflictSpectral(torch.optim.Optimizer):
    """The SIFT update of the selected matrices; ``SIFT`` differentiates and calls ``update``.

    A torch optimizer only for its bookkeeping: the hyperparameters live in the param group (schedulers
    work) and the two momenta in ``self.state[p]``, so torch's state_dict saves and restores them.
    """

    def __init__(
        self, params: list[Any], lr: float, momentum: float, rank: int, threshold: float, weight_decay: float
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "rank": rank, "threshold": threshold, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def update(
        self, keys: list[str], forget: list[torch.Tensor | None], retain: list[torch.Tensor | None]
    ) -> tuple[dict[str, float], list[str]]:
        """Apply one step from the per-side gradients of every param (in group order); returns the cosine
        of the two momenta per matrix (where both are non-zero) and the matrices that took the SIFT branch."""
        cosines: dict[str, float] = {}
        sifted: list[str] = []
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        for key, (group, p), g_f, g_r in zip(keys, params, forget, retain, strict=True):
            if g_f is None and g_r is None:  # not reached by the loss this step: no update, as in torch
                continue
            state = self.state[p]
            momenta = [self._accumulate(state, "forget_momentum", g_f, group["momentum"]),
                       self._accumulate(state, "retain_momentum", g_r, group["momentum"])]
            m_f, m_r = (m.float() if m is not None else None for m in momenta)  # a missing one is zero
            cosine = None
            if m_f is not None and m_r is not None:
                norms = float(m_f.norm()) * float(m_r.norm())
                if norms > 0:  # undefined otherwise: never a conflict
                    cosine = float((m_f * m_r).sum()) / norms
                    cosines[key] = cosine
            k = min(group["rank"], min(p.shape) // 2)  # 2k joint columns must fit in the matrix
            if m_f is not None and m_r is not None and cosine is not None and cosine < group["threshold"] and k >= 1:
                direction = sift_direction(m_f, m_r, k)
                sifted.append(key)
            else:
                present = [m for m in (m_f, m_r) if m is not None]
                direction = newton_schulz(present[0] if len(present) == 1 else present[0] + present[1])
            lr = group["lr"]
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])  # decoupled, before the step, as torch.optim.Muon
            p.add_(direction.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return cosines, sifted

    @staticmethod
    def _accumulate(
        state: dict[str, Any], key: str, grad: torch.Tensor | None, beta: float
    ) -> torch.Tensor | None:
        """m ← β·m + g; a missing momentum is zero and is only allocated once a gradient arrives, so a
        run without a retain part never holds a second buffer."""
        m = state.get(key)
        if m is None:
            if grad is not None:
                state[key] = grad.detach().clone(memory_format=torch.preserve_format)
            return state.get(key)
        m.mul_(beta)
        if grad is not None:
            m.add_(grad)
        return m


@OPTIMIZERS.register("sift")
class SIFT(_Composite):
    """SIFT-style conflict control: per-side momenta, and a joint orthogonal update where they conflict.

    The closure's parts are split in two: ``retain``, and everything else (``forget``, or a single
    ``total``/``finetune`` part, or a bare tensor), which counts as the forget side. With no retain part
    there is never a conflict and the selected matrices take plain Muon steps (momentum without Nesterov).

    Selected: 2-D parameters whose name matches ``pattern`` (every 2-D one when given without names).
    Everything else (embeddings, norms, other matrices): AdamW on the total gradient, ``adamw_*`` options.
    Per step (β = ``momentum``, k = min(``rank``, min(rows, cols) // 2)):

        m_f ← β·m_f + g_f,  m_r ← β·m_r + g_r,  cos = ⟨m_f, m_r⟩ / (‖m_f‖·‖m_r‖)
        O = polar([U_r, U_f])·polar([V_r, V_f])ᵀ   if cos < threshold   (top-k singular vectors of m_r, m_f)
        O = newton_schulz(m_f + m_r)               otherwise
        W ← W·(1 − lr·weight_decay) − lr·√max(1, rows/cols)·O

    The gradients of both sides come from one closure call and two backward passes (the first keeps the
    graph, in case the parts share one). After each step ``last_conflicts`` maps each selected matrix (its
    name, or its index when unnamed) to its cosine (left out where a momentum is zero) and ``last_sift``
    lists the matrices that took the SIFT branch. Default learning rates as ``Muon``'s.
    """

    grade = "spectral"
    uses_gradients = True

    @dataclass(frozen=True)
    class Settings(SpectralSettings):
        rank: int = setting(8, limit=AT_LEAST_ONE)
        threshold: float = setting(0.0, limit=Limit(ge=-1, le=1))  # compared with a cosine
        pattern: str = SIFT_PATTERN

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        s = read_settings(type(self), options)
        pattern = s.pattern
        selects = compile_pattern("pattern", pattern)
        items = list(params)
        selected, other, keys = [], [], []
        for index, item in enumerate(items):
            name, p = _split_item(item)
            if p.ndim == 2 and (name is None or selects.search(name)):
                selected.append(item)
                keys.append(name if name is not None else str(index))
            else:
                other.append(item)
        if not selected:  # it would silently be plain AdamW
            sample = next((n for n, p in map(_split_item, items) if p.ndim == 2 and n), "no 2-D parameter")
            raise ModelDependent(f"pattern {pattern!r} selects no trainable 2-D parameter (e.g. {sample!r}); "
                             f"set 'pattern' to match this model's matrix names")
        parts: dict[str, torch.optim.Optimizer] = {
            "sift": _ConflictSpectral(selected, s.lr, s.momentum, s.rank, s.threshold, s.weight_decay)
        }
        if other:
            parts["adamw"] = _adamw(other, s.adamw_lr, s.adamw_betas, s.adamw_weight_decay)
        super().__init__(items, parts)
        self.keys = keys
        self.last_conflicts: dict[str, float] = {}
        self.last_sift: list[str] = []

    def diagnostics(self) -> dict[str, float]:
        """Per-step figures for the training log: how many matrices conflicted, and the mean cosine."""
        cosines = list(self.last_conflicts.values())
        return {"sift_matrices": float(len(self.last_sift)),
                "mean_cosine": sum(cosines) / len(cosines) if cosines else float("nan")}

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        closure = require_closure(closure)
        core = self.parts["sift"]
        assert isinstance(core, _ConflictSpectral)
        selected = [p for group in core.param_groups for p in group["params"]]
        # Gradients left over from outside would be counted as forget gradients.
        self.zero_grad(set_to_none=True)
        split = sharded(closure)
        forget_grads: list[torch.Tensor | None] = [None] * len(selected)
        values: list[float] = []
        with torch.enable_grad():
            for shard in split.shards():
                values.append(self._backward_sides(shard(), selected, forget_grads))
        if split.processes > 1:
            forget_grads = [torch.zeros_like(p) if g is None else g
                            for g, p in zip(forget_grads, selected, strict=True)]
            for p in self._own_params():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            split.sum_tensors([*forget_grads, *(p.grad for p in self._own_params())])
        retain_grads = [p.grad for p in selected]
        loss = torch.tensor(split.sum_values(values), dtype=torch.float32)
        self.last_conflicts, self.last_sift = core.update(self.keys, forget_grads, retain_grads)
        if "adamw" in self.parts:
            self.parts["adamw"].step()
        self.zero_grad(set_to_none=True)
        return loss

    def _own_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @staticmethod
    def _backward_sides(value: Any, selected: list[torch.Tensor], forget_grads: list[torch.Tensor | None]) -> float:
        """One shard's two backward passes: its forget gradient of the selected matrices is added to
        `forget_grads` (moved out of .grad), everything else (its retain gradient, and the total gradient of the
        other parameters) accumulates in .grad as usual. Returns the shard's loss."""
        parts = loss_parts(value)
        retain = parts.pop("retain", None)
        forget = sum(parts.values()) if parts else None
        sides = [s for s in (forget, retain) if isinstance(s, torch.Tensor) and s.requires_grad]
        if not sides:
            raise ValueError("the closure's loss does not depend on the parameters (nothing requires grad)")
        if isinstance(forget, torch.Tensor) and forget.requires_grad:
            kept = [p.grad for p in selected]  # earlier shards' retain gradients
            for p in selected:
                p.grad = None
            forget.backward(retain_graph=len(sides) == 2)  # the retain part may share this graph
            # Move the selected matrices' g_f out of .grad (a reference, no copy); the others keep theirs, and the
            # retain backward adds g_r to it: AdamW then sees the total gradient.
            for i, p in enumerate(selected):
                grad, p.grad = p.grad, kept[i]
                if grad is not None:
                    forget_grads[i] = grad if forget_grads[i] is None else forget_grads[i].add_(grad)
        if isinstance(retain, torch.Tensor) and retain.requires_grad:
            retain.backward()
        return float(total_loss(value).detach())
