"""Unlearning methods: the protocol and registry (base), and the built-in methods by family. Every module here is
imported when the registry is first read, so a method registers by being defined in one of them."""

from unlearn.training.methods.base import METHODS, WEIGHT, Batch, LanguageModeling, Method, build_method
from unlearn.training.methods.likelihood import GradAscent, GradDiff, KLRetain
from unlearn.training.methods.preference import NPO, IdkDPO, SimNPO
from unlearn.training.methods.representation import RMU, layer_activations
from unlearn.training.methods.smoothing import RSNPO, SAMNPO, shifted_weights
from unlearn.training.methods.task_vector import TaskVector

__all__ = ["METHODS", "NPO", "RMU", "RSNPO", "SAMNPO", "WEIGHT", "Batch", "GradAscent", "GradDiff", "IdkDPO",
           "KLRetain", "LanguageModeling", "Method", "SimNPO", "TaskVector", "build_method", "layer_activations",
           "shifted_weights"]
