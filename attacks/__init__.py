"""Attacks on an unlearned model. Each module registers an `Attack` class in `ATTACKS` (attacks/base.py);
importing this package registers them all. See docs/EXTENDING.md."""

from unlearn.attacks import quantize, relearn  # noqa: F401 - imported for their registrations
from unlearn.attacks.base import ATTACKS, Attack, AttackResult, Subject

__all__ = ["ATTACKS", "Attack", "AttackResult", "Subject"]
