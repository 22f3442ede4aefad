"""Optimizers of every grade behind one protocol: ``opt.step(closure)``, the closure returning the loss.

Build by name with ``build_optimizer(name, params, **options)``; ``OPTIMIZERS`` lists the names.
"""

from unlearn.optim.first_order import SGD, AdamW
from unlearn.optim.hybrid import Hybrid
from unlearn.optim.protocol import (
    OPTIMIZERS,
    BackwardStep,
    Closure,
    build_optimizer,
    check_options,
    dry_build,
    register,
)
from unlearn.optim.second_order import Sophia
from unlearn.optim.sign import SignAdam, SignSGD, Signum
from unlearn.optim.spectral import SIFT, Muon, newton_schulz
from unlearn.optim.zo import FZOO, HiZOO, LowRankZO, ZerothOrder, ZerothOrderAdam, ZerothOrderSign, ZOMuon

__all__ = [
    "FZOO",
    "OPTIMIZERS",
    "SGD",
    "SIFT",
    "AdamW",
    "BackwardStep",
    "Closure",
    "HiZOO",
    "Hybrid",
    "LowRankZO",
    "Muon",
    "SignAdam",
    "SignSGD",
    "Signum",
    "Sophia",
    "ZOMuon",
    "ZerothOrder",
    "ZerothOrderAdam",
    "ZerothOrderSign",
    "build_optimizer",
    "check_options",
    "dry_build",
    "newton_schulz",
    "register",
]
