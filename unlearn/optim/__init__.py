"""Optimizers of every grade behind one protocol: ``opt.step(closure)``, the closure returning the loss.

Build by name with ``build_optimizer(name, params, **options)``; ``OPTIMIZERS`` lists the names.
"""

from unlearn.optim.first_order import SGD, AdamW
from unlearn.optim.hybrid import Hybrid
from unlearn.optim.protocol import OPTIMIZERS, BackwardStep, Closure, build_optimizer, check_options, register
from unlearn.optim.sign import SignSGD
from unlearn.optim.zo import ZerothOrder

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "AdamW",
    "BackwardStep",
    "Closure",
    "Hybrid",
    "SignSGD",
    "ZerothOrder",
    "build_optimizer",
    "check_options",
    "register",
]
