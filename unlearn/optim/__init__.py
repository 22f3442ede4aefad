"""Optimizers of every grade behind one protocol: ``opt.step(closure)``, the closure returning the loss.

Build by name with ``unlearn.optim.protocol.build_optimizer(name, params, **options)``; ``OPTIMIZERS`` (beside the
protocol) lists the names, each registered with ``@OPTIMIZERS.register("name")`` in the module of its grade.
"""
