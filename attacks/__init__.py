"""Attacks on an unlearned model. Each module registers an `Attack` class with `@ATTACKS.register("name")`
(attacks/base.py); the registry imports every module of this package when it is first read. See docs/EXTENDING.md."""
