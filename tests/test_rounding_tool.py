"""tools/rounding.py: how much of an update survives the attack's rounding, on updates whose fate is known."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import load_tool, make_model


@pytest.fixture(scope="module")
def rounding():
    return load_tool("rounding")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"a": torch.randn(16, 128, generator=generator), "b": torch.randn(8, 64, generator=generator)}


def moved(weights: dict[str, torch.Tensor], scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: w + scale * torch.randn(w.shape, generator=generator) for k, w in weights.items()}


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_a_tiny_update_is_erased_and_a_large_one_kept(rounding, weights, kind):
    round_trip = rounding.round_trip(kind)
    tiny = rounding.survival(weights, moved(weights, 1e-4), round_trip)
    assert tiny["changed"] == 1.0
    assert tiny["erased"] > 0.99  # 1e-4 is far below any bin: almost no weight crosses a boundary
    assert tiny["cosine"] < 0.5  # what is left is a few full-bin jumps, not the update's shape
    large = rounding.survival(weights, moved(weights, 3.0), round_trip)
    assert large["erased"] < 0.3
    assert large["cosine"] > 0.9  # moves far wider than a bin survive rounding, up to its error


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_codes_are_read_in_the_weights_order(rounding, kind):
    """One weight moved across a bin edge, the block's scale unchanged: exactly that weight's code and value change
    (a swapped nibble order would put the changed code on its neighbour)."""
    weight = torch.linspace(-0.9, 0.9, 2 * 128).reshape(2, 128)
    weight[:, 0] = 2.0  # every block's and row's absmax, kept fixed
    moved = weight.clone()
    moved[1, 37] += 0.8
    codes, values = rounding.round_trip(kind)(weight)
    codes_moved, values_moved = rounding.round_trip(kind)(moved)
    index = 128 + 37
    assert torch.nonzero(codes_moved != codes).flatten().tolist() == [index]
    assert torch.nonzero(values_moved != values).flatten().tolist() == [index]


def test_untouched_weights_have_nothing_to_keep(rounding, weights):
    same = rounding.survival(weights, {k: w.clone() for k, w in weights.items()}, rounding.round_trip("nf4"))
    assert same["changed"] == 0.0
    assert math.isnan(same["erased"]) and math.isnan(same["cosine"])


def test_the_attacks_layers_are_compared_and_a_run_folder_is_read(rounding, tmp_path, tokenizer, capsys):
    target, unlearned = make_model(len(tokenizer), seed=0), make_model(len(tokenizer), seed=0)
    with torch.no_grad():  # a large move on one layer the attack quantizes, none elsewhere
        unlearned.model.layers[0].mlp.down_proj.weight.add_(1.0)
    target.save_pretrained(tmp_path / "target")
    unlearned.save_pretrained(tmp_path / "run" / "model")
    quantized = rounding.quantized_weights(target)
    assert "model.layers.0.mlp.down_proj" in quantized and "lm_head" not in quantized  # the attack's own choice
    assert rounding.main(["--target", str(tmp_path / "target"), str(tmp_path / "run"), "--kinds", "int8"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split("|")
    changed, cosine = float(row[3]), float(row[5])
    share = unlearned.model.layers[0].mlp.down_proj.weight.numel() / sum(w.numel() for w in quantized.values())
    assert changed == pytest.approx(share, abs=1e-3)
    assert cosine > 0.9


def test_a_folder_without_safetensors_is_refused(rounding, tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no safetensors"):
        rounding.main(["--target", str(tmp_path / "run" / "model"), str(tmp_path / "run")])
