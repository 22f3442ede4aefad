"""Evaluation edge cases."""

import math

import torch

from unlearn.evaluate import perplexity


def test_perplexity_of_a_wrecked_model_is_inf_not_a_crash(tiny):
    model, tok = tiny
    texts = ["Bo keeps a ferret."]
    assert 1.0 < perplexity(model, tok, texts) < 1e3
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e6)  # logits so extreme that mean NLL exceeds ~709
    assert perplexity(model, tok, texts) == math.inf
