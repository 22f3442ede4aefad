"""Quantization attack: bnb in memory == bnb through from_pretrained, RTN behaves, bad specs are refused.

The models here are a little wider than conftest's (hidden 64): bitsandbytes' 4-bit CPU kernel
needs layer widths that are multiples of its block size of 64.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from unlearn.attacks.quantize import (
    QuantSpec,
    fake_quantize,
    load_quantized,
    quantizable_linears,
    quantize_in_memory,
    rtn_quantize_,
)
from unlearn.core.errors import UserError

VOCAB = 128
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BNB_SPECS = [QuantSpec("bnb", 4, "nf4"), QuantSpec("bnb", 4, "fp4"), QuantSpec("bnb", 8)]


def make_wide_model(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """Random Llama with biases (so the bias path is exercised) and 64-wide layers."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=tie,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for module in quantizable_linears(model).values():
            module.bias.normal_(0, 0.02)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def saved_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wide-tied" if request.param else "wide-untied")
    make_wide_model(tie=request.param).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def layer_types(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}


# ---------------------------------------------------------------- bnb


@pytest.mark.parametrize("spec", BNB_SPECS, ids=lambda s: s.name)
def test_in_memory_bnb_equals_from_pretrained(saved_dir, tokens, spec):
    reference = load_quantized(saved_dir, spec)
    floating = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32)
    float_logits = logits(floating, tokens)
    ours = quantize_in_memory(floating, spec)
    assert layer_types(ours) == layer_types(reference)
    got, want = logits(ours, tokens), logits(reference, tokens)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"
    assert not torch.allclose(got, float_logits, atol=1e-4)  # it did quantize


def test_bnb_quantizes_the_projections_only(saved_dir):
    model = load_quantized(saved_dir, QuantSpec("bnb", 4))
    expected = {f"model.layers.{i}.{p}": "Linear4bit" for i in range(2) for p in PROJECTIONS}
    assert layer_types(model) == expected | {"lm_head": "Linear"}
    assert model.training is False


def test_quantizable_linears_skip_head_and_embeddings():
    for tie in (True, False):
        names = set(quantizable_linears(make_wide_model(tie=tie)))
        assert names == {f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}


def test_cpu_4bit_refuses_narrow_layers_and_leaves_model_intact(tiny):
    import bitsandbytes as bnb

    if not bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu:
        pytest.skip("only CPUs with AVX512-BF16 have the 64-multiple width limit")
    model, _ = tiny  # hidden 32: not a multiple of bnb's block size
    with pytest.raises(UserError, match="divisible by 64"):
        quantize_in_memory(model, QuantSpec("bnb", 4))
    assert not any("4bit" in kind for kind in layer_types(model).values())


# ---------------------------------------------------------------- rtn


def relative_error(model: torch.nn.Module, spec: QuantSpec, tokens: torch.Tensor, reference: torch.Tensor) -> float:
    quantized = quantize_in_memory(copy.deepcopy(model), spec)
    return ((logits(quantized, tokens) - reference).norm() / reference.norm()).item()


def test_rtn_error_shrinks_with_bits(tokens):
    model = make_wide_model()
    reference = logits(model, tokens)
    errors = {bits: relative_error(model, QuantSpec("rtn", bits), tokens, reference) for bits in (2, 3, 4, 8)}
    assert errors[2] > errors[3] > errors[4] > errors[8], errors
    assert errors[8] < 0.01, errors
    assert errors[2] > 0.1, errors


def distinct_per_group(weight: torch.Tensor, width: int) -> int:
    """Largest number of distinct values in any row of any column group."""
    return max(len(row.unique()) for chunk in weight.split(width, dim=1) for row in chunk)


@pytest.mark.parametrize(("bits", "group_size"), [(2, None), (3, None), (3, 16), (4, 48), (8, None)])
def test_rtn_grid_and_untouched_layers(bits, group_size):
    model = make_wide_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    summary = rtn_quantize_(model, bits, group_size)
    assert summary == {"layers": 14, "bits": bits, "group_size": group_size}
    quantized = {f"{name}.weight" for name in quantizable_linears(model)}
    for name, param in model.named_parameters():
        if name in quantized:
            width = group_size or param.shape[1]  # 48 leaves a trailing group of 16 columns
            assert distinct_per_group(param, width) <= 2**bits
            assert not torch.equal(param, before[name])
        else:  # embeddings (= tied head), norms and biases
            assert torch.equal(param, before[name]), name


def test_fake_quantize_error_is_at_most_half_a_step():
    weight = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    weight[0] = 0.0  # an all-zero row must survive (no division by a zero scale)
    for bits in (2, 3, 4, 8):
        restored = fake_quantize(weight, bits, group_size=16)
        for start in range(0, 40, 16):
            cols = slice(start, start + 16)
            low = weight[:, cols].amin(1, keepdim=True).clamp(max=0)
            high = weight[:, cols].amax(1, keepdim=True).clamp(min=0)
            step = (high - low) / (2**bits - 1)
            assert ((restored[:, cols] - weight[:, cols]).abs() <= step / 2 + 1e-6).all()
        assert torch.equal(restored[0], weight[0])


def test_load_quantized_rtn_from_folder(saved_dir, tokens):
    spec = QuantSpec("rtn", 4, group_size=32)
    loaded = load_quantized(saved_dir, spec)
    expected = quantize_in_memory(AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32), spec)
    assert loaded.training is False
    assert torch.equal(logits(loaded, tokens), logits(expected, tokens))


# ---------------------------------------------------------------- specs and errors


@pytest.mark.parametrize(("spec", "name"), [
    (QuantSpec("bnb", 4), "bnb-4bit-nf4"), (QuantSpec("bnb", 4, "fp4"), "bnb-4bit-fp4"),
    (QuantSpec("bnb", 8), "bnb-8bit"), (QuantSpec("rtn", 3, group_size=64), "rtn-3bit-g64"),
    (QuantSpec("rtn", 4), "rtn-4bit-channel"),
])
def test_spec_names(spec, name):
    assert spec.name == name


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "rtn", "bits": 5}, "rtn quantization supports 2, 3, 4, 8 bits"),
    ({"method": "bnb", "bits": 3}, "bnb quantization supports 4, 8 bits"),
    ({"method": "bnb", "bits": 4, "quant_type": "int4"}, "quant type"),
    ({"method": "rtn", "bits": 4, "group_size": 0}, "positive"),
    ({"method": "bnb", "bits": 4, "group_size": 64}, "rtn only"),
    ({"method": "gptq", "bits": 4}, "method"),
    ({"method": "quanto", "bits": 3}, "quanto quantization supports 2, 4, 8 bits"),
])
def test_invalid_specs(kwargs, message):
    with pytest.raises(UserError, match=message):
        QuantSpec(**kwargs)


def test_rtn_quantize_validates_bits():
    with pytest.raises(UserError, match="supports"):
        rtn_quantize_(make_wide_model(), 5)


def test_missing_model_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_quantized(tmp_path / "nope", QuantSpec("rtn", 4))
    with pytest.raises(UserError, match="config.json"):
        load_quantized(tmp_path, QuantSpec("bnb", 8))


# ---------------------------------------------------------------- optimum-quanto


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quanto_quantizes_the_projections_and_loads_alike(saved_dir, tokens, bits):
    spec = QuantSpec("quanto", bits)
    loaded = load_quantized(saved_dir, spec)
    expected = quantize_in_memory(AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32), spec)
    assert torch.equal(logits(loaded, tokens), logits(expected, tokens))
    types = layer_types(loaded)
    assert {n for n, t in types.items() if t == "QLinear"} == {
        f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert spec.name == f"quanto-{bits}bit"


def test_quanto_int8_is_symmetric_absmax_per_output_channel():
    model = make_wide_model()
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    quantize_in_memory(model, QuantSpec("quanto", 8))
    got = model.model.layers[0].mlp.down_proj.weight.dequantize()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127  # by hand: one scale per output row, zero at zero
    assert torch.allclose(got.float(), torch.round(weight / scale) * scale, atol=1e-6)
    assert (got.float() - weight).abs().le(scale / 2 + 1e-6).all()
