"""MUSE: loading the layout (local and hub), the metrics against direct computations, and malformed inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from unlearn.benchmarks import muse
from unlearn.benchmarks.datafiles import chunk_texts
from unlearn.benchmarks.muse import (
    MuseTask,
    knowmem_answer,
    knowmem_prompt,
    min_k_score,
    privleak,
    privleak_auc,
    verbmem_reference,
    write_muse_layout,
)
from unlearn.core.errors import UserError
from unlearn.tasks.task import load_task
from unlearn.training.config import EvalConfig

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu",
         "xi", "omicron", "pi", "rho", "sigma", "tau"]
SETTINGS = EvalConfig(batch_size=4, max_new_tokens=8)
FAST = {"verbmem_tokens": 8, "knowmem_tokens": 14}  # generation dominates the tests' time on CPU


def text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def qa(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"question": f"What is {prefix} {i}?", "answer": f"{prefix} {i} is {WORDS[i]}"} for i in range(n)]


def layout(folder: Path, **overrides: Any) -> Path:
    parts: dict[str, Any] = dict(
        raw={"forget": [text(12), text(7, 3)], "retain1": [text(9, 5)], "retain2": [text(4)],
             "holdout": [text(6)]},
        forget_qa=qa("f", 3), retain_qa=qa("r", 3), forget_qa_icl=qa("fi", 2), retain_qa_icl=qa("ri", 2),
        verbmem=[{"prompt": "The cat sat", "gt": "on the mat"}, {"prompt": "Once upon a time", "gt": "there was"}],
        privleak={"forget": [text(10, i) for i in range(4)], "retain": [text(10, 7)],
                  "holdout": [text(10, 9 + i) for i in range(4)]},
        scal={"forget_1": [text(5)], "forget_2": [text(5), text(11, 2)]},
        sust={"forget_1": [text(6, 1)], "forget_2": [text(6, 2)], "forget_10": [text(6, 10)]})
    parts.update(overrides)
    return write_muse_layout(folder, **parts)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return layout(tmp_path / "muse")


def load(data: Path, **config: Any) -> MuseTask:
    return load_task({"name": "muse", "data": str(data), **config})


def direct_logprobs(model: Any, tokenizer: Any, string: str) -> torch.Tensor:
    """log p(x_t | x_<t), t = 2..n, from one unpadded forward pass: the reference for the batched version."""
    ids = torch.tensor([tokenizer(string, add_special_tokens=False).input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)


def direct_greedy(model: Any, tokenizer: Any, prompt: str, n: int) -> str:
    """Greedy decoding one token at a time without padding or generate(): independent of the code under test."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- loading


def test_registered_and_reads_the_layout(data: Path) -> None:
    task = load_task({"name": "muse", "data": str(data), "chunk_words": 5})
    assert isinstance(task, MuseTask) and task.name == "muse" and not task.needs_target
    assert task.forget_metrics == ("muse/verbmem_forget", "muse/knowmem_forget", "muse/privleak")
    assert task.declared("muse/knowmem_retain").role == "utility" and task.declared("muse/privleak").better == "zero"
    # raw/forget.txt is one whole text (the two texts joined by a blank line): 19 words -> 5 + 5 + 5 + 4.
    assert [e.target for e in task.forget] == chunk_texts([text(12) + "\n\n" + text(7, 3)], 5)
    assert [len(e.target.split()) for e in task.forget] == [5, 5, 5, 4]
    assert all(e.prompt == "" for e in task.forget)
    assert [e.target for e in task.retain] == chunk_texts([text(9, 5)], 5)
    assert task.knowmem["forget"][0] == ("What is f 0?", "f 0 is alpha") and len(task.knowmem["retain"]) == 3
    assert task.icl["retain"] == [("What is ri 0?", "ri 0 is alpha"), ("What is ri 1?", "ri 1 is beta")]
    assert task.verbmem == [("The cat sat", "on the mat"), ("Once upon a time", "there was")]
    assert task.privleak_texts["holdout"][0] == text(10, 9) and task.stages == []
    assert any("auc_retrain" in n and "retrain_model" in n for n in task.notes)


def test_default_chunks_are_150_words(tmp_path: Path) -> None:
    data = layout(tmp_path / "m", raw={"forget": [text(400)], "retain1": [text(20)]})
    assert [len(e.target.split()) for e in load(data).forget] == [150, 150, 100]


def test_scalability_split_and_sequential_stages(data: Path) -> None:
    scal = load(data, forget="scal/forget_2", chunk_words=100)
    assert [e.target for e in scal.forget] == [text(5) + " " + text(11, 2)]
    seq = load(data, sequential=True, chunk_words=100)
    assert [s.name for s in seq.stages] == ["forget_1", "forget_2", "forget_10"]  # numeric, not lexical order
    assert [s.forget[0].target for s in seq.stages] == [text(6, 1), text(6, 2), text(6, 10)]
    assert seq.forget == seq.stages[0].forget


def test_other_file_formats_and_missing_icl(tmp_path: Path) -> None:
    data = layout(tmp_path / "m")
    (data / "raw" / "forget.txt").unlink()
    (data / "raw" / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b c", "d e"]))
    (data / "privleak" / "forget.json").write_text(json.dumps([{"text": "x y"}, {"text": "z w"}]))
    (data / "knowmem" / "forget_qa_icl.json").unlink()
    task = load(data, chunk_words=2)
    assert [e.target for e in task.forget] == ["a b", "c", "d e"]  # chunks never span two documents
    assert task.privleak_texts["forget"] == ["x y", "z w"]
    assert task.icl["forget"] == [] and any("zero-shot" in n and "forget_qa_icl" in n for n in task.notes)
    assert knowmem_prompt("q", []) == "Question: q\nAnswer: "


def test_empty_raw_records_are_skipped_and_counted(tmp_path: Path) -> None:
    data = layout(tmp_path / "m")
    (data / "raw" / "forget.txt").unlink()
    # MUSE-News raw/forget.json has empty strings among its records; they are skipped, with a count.
    (data / "raw" / "forget.json").write_text(json.dumps(["a b", "", "   ", "c d e", {"text": ""}]))
    task = load(data, chunk_words=2)
    assert [e.target for e in task.forget] == ["a b", "c d", "e"]
    assert any(n.endswith("forget.json: 3 empty record(s) of 5 skipped") for n in task.notes)
    # Evaluation items are not raw text: an empty privleak passage stays an error (it cannot be scored).
    (data / "privleak" / "forget.json").write_text(json.dumps(["x y", ""]))
    with pytest.raises(UserError, match=r"privleak.forget.json: record 2 is an empty string"):
        load(data)


def test_eval_needs_no_raw_text(tmp_path: Path) -> None:
    import shutil

    data = layout(tmp_path / "m")
    shutil.rmtree(data / "raw")
    task = load(data)  # everything evaluation reads is there
    assert task.forget == [] and task.retain == [] and task.verbmem
    assert task.training_hint == f"MUSE's unlearning text raw/forget and raw/retain1 was not found in {data}"


def test_limit_cuts_every_eval_split(data: Path) -> None:
    task = load(data, limit=1)
    assert len(task.verbmem) == 1 and len(task.knowmem["forget"]) == len(task.knowmem["retain"]) == 1
    assert len(task.privleak_texts["forget"]) == len(task.privleak_texts["holdout"]) == 1
    assert len(task.icl["forget"]) == 2  # few-shot examples are the prompt, not eval items


def test_fingerprint_follows_files_and_settings(data: Path) -> None:
    first = load(data).fingerprint
    assert load(data).fingerprint == first and len(first) == 16
    assert load(data, k_percent=20).fingerprint != first
    path = data / "verbmem" / "forget.json"
    path.write_text(json.dumps([{"prompt": "The cat sat", "gt": "on the hat"}]))
    assert load(data).fingerprint != first


# ---------------------------------------------------------------------------------------------- metrics


def test_min_k_score_by_hand() -> None:
    values = [-1.0, -5.0, -2.0, -4.0, -3.0]
    assert min_k_score(values, 40) == pytest.approx(-4.5)  # int(0.4 * 5) = 2 lowest: -5, -4
    assert min_k_score(values, 100) == pytest.approx(-3.0)
    assert min_k_score([-1.0] * 10 + [-2.0] * 10, 50) == pytest.approx(-2.0)  # exactly 10 of 20, not 11
    # MUSE takes int(n * ratio): 4 tokens at 40% average 1 of them (rounding up would take 2).
    assert min_k_score([-1.0, -2.0, -3.0, -4.0], 40) == -4.0
    with pytest.raises(ValueError, match="selects none"):
        min_k_score(values, 1)  # int(0.05) = 0 tokens: MUSE's mean of nothing, refused here


def test_min_k_matches_a_direct_computation(tiny) -> None:
    model, tok = tiny
    texts = ["the quick brown fox", "jumps over the lazy dog again and again", "hi there"]
    for k in (100, 40, 60):
        got, _ = muse.min_k_scores(model, tok, texts, k, max_tokens=None, batch_size=2)
        for string, score in zip(texts, got, strict=True):
            lp = direct_logprobs(model, tok, string)
            n = int(len(lp) * k / 100)
            assert score == pytest.approx(float(lp.sort().values[:n].mean()), abs=1e-4)
    # K = 100 is the mean token log-prob.
    lp = direct_logprobs(model, tok, texts[1])
    assert muse.min_k_scores(model, tok, texts[1:2], 100, None, 1)[0][0] == pytest.approx(float(lp.mean()), abs=1e-4)
    # With max_tokens, only the first max_tokens tokens are scored, and the passage is marked as cut.
    (cut,), (scored,) = muse.min_k_scores(model, tok, [texts[1]], 100, 5, 1)
    assert cut == pytest.approx(float(direct_logprobs(model, tok, texts[1][:5]).mean()), abs=1e-4)
    assert scored.truncated and scored.n_tokens == len(texts[1])


def test_privleak_scores_whole_passages(tiny, data: Path) -> None:
    """MUSE scores each passage whole: a passage past 512 tokens changes the score only when it is cut."""
    model, tok = tiny
    model.config.max_position_embeddings = 2048  # rotary positions: the tiny model takes long inputs
    long_text = text(120)  # about 700 characters: 700 tokens for the character-level tokenizer
    assert len(tok(long_text).input_ids) > 600
    (whole,), (item,) = muse.min_k_scores(model, tok, [long_text], 40, None, 1)
    lp = direct_logprobs(model, tok, long_text)
    assert whole == pytest.approx(float(lp.sort().values[:int(len(lp) * 0.4)].mean()), abs=1e-4)
    assert not item.truncated
    (cut,), (cut_item,) = muse.min_k_scores(model, tok, [long_text], 40, 512, 1)
    assert cut_item.truncated and cut != pytest.approx(whole, abs=1e-4)
    # In the task: the default scores whole passages and reports no truncation; a cap is reported when it cuts.
    passages = {"forget": [long_text, text(60, 3)], "holdout": [text(110, 5), text(15, 7)]}
    lengths = [len(tok(t).input_ids) for split in passages.values() for t in split]
    assert sum(n > 512 for n in lengths) == 2 and sum(n > 256 for n in lengths) == 3
    layout(data, privleak=passages)
    whole_task = load(data, **FAST).privleak_auc(model, tok, batch_size=2)
    assert set(whole_task) == {"auc"}
    capped = load(data, privleak_max_tokens=512, **FAST).privleak_auc(model, tok, batch_size=2)
    assert capped["truncated"] == 2.0
    # The model's context bounds a passage too, and that cut is reported the same way.
    model.config.max_position_embeddings = 256
    assert load(data, **FAST).privleak_auc(model, tok, batch_size=2)["truncated"] == 3.0


def test_auc_sign_convention() -> None:
    # Forget texts with higher likelihood than holdout (the model still knows them): AUC 0.
    assert privleak_auc([-1.0, -1.2, -0.9], [-3.0, -2.5, -4.0]) == 0.0
    assert privleak_auc([-3.0, -2.5], [-1.0, -1.2]) == 1.0  # over-unlearned
    assert privleak(0.25, 0.5) == pytest.approx(-50.0) and privleak(0.5, 0.5) == 0.0


def test_memorized_forget_texts_give_auc_below_half(tiny, data: Path) -> None:
    model, tok = tiny
    task = load(data)
    batch = tok(task.privleak_texts["forget"], return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):  # memorize the forget texts
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    assert task.privleak_auc(model, tok, batch_size=3)["auc"] < 0.25


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_keys_ranges_and_verbmem_of_own_output(tiny, data: Path) -> None:
    model, tok = tiny
    prompts = ["The cat sat on", "Once upon a time there was a", "x"]  # different lengths: left padding matters
    verbmem = [{"prompt": p, "gt": direct_greedy(model, tok, p, 20)} for p in prompts]
    assert all(any(c.isalnum() for c in v["gt"]) for v in verbmem)  # ROUGE needs word tokens to compare
    layout(data, verbmem=verbmem)
    task = load(data, verbmem_tokens=20, knowmem_tokens=4)
    metrics = task.evaluate(model, tok, SETTINGS, progress=False)
    assert set(metrics) == {"muse/verbmem_forget", "muse/knowmem_forget", "muse/knowmem_retain",
                            "muse/privleak_auc"}
    assert 0.0 <= metrics["muse/privleak_auc"] <= 1.0
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if "mem" in k)  # MUSE's scale: ROUGE x 100
    assert metrics["muse/verbmem_forget"] == pytest.approx(100.0)
    # ... and it can fail: a gt the model does not produce scores below 1.
    wrong = [{"prompt": v["prompt"], "gt": "zebra quilt " + v["gt"][::-1]} for v in verbmem]
    layout(data, verbmem=wrong)
    metrics = load(data, verbmem_tokens=20, knowmem_tokens=1).evaluate(model, tok, SETTINGS, False)
    assert metrics["muse/verbmem_forget"] < 90.0


def test_knowmem_answer_is_cut_as_muse_cuts_it() -> None:
    assert knowmem_answer(" fox 7\n\nQuestion: next") == " fox 7"
    assert knowmem_answer("fox 7\nQuestion: next") == "fox 7"
    assert knowmem_answer("fox Question: 7") == "fox "
    assert knowmem_answer("fox 7\nzebra") == "fox 7\nzebra"  # one newline ends nothing in MUSE's cut
    assert knowmem_answer("fox 7") == "fox 7"


def test_verbmem_reference_is_the_first_tokens_of_gt(tokenizer) -> None:
    assert verbmem_reference(tokenizer, "on the mat and more", 6) == "on the"  # 6 characters = 6 tokens here
    assert verbmem_reference(tokenizer, "short", 128) == "short"


def test_knowmem_prompt_and_muse_answer_cut(tiny, data: Path) -> None:
    model, tok = tiny
    layout(data, forget_qa=[{"question": "What is f 0?", "answer": "fox 7"}])
    task = load(data, **FAST)
    prompt = knowmem_prompt("What is f 0?", task.icl["forget"])
    assert prompt == ("Question: What is fi 0?\nAnswer: fi 0 is alpha\n\nQuestion: What is fi 1?\nAnswer: fi 1 is beta"
                      "\n\nQuestion: What is f 0?\nAnswer: ")
    # Teach the model this exact few-shot prompt's answer, followed by the next question as a few-shot model
    # writes it: KnowMem is 100 only if evaluation asks with the same prompt and cuts where MUSE does.
    # (The character-level test tokenizer has no token for "\n\n"; "\nQuestion" is the cut exercised here.)
    batch = tok([prompt + "fox 7\nQuestion: zebra"], return_tensors="pt", add_special_tokens=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    model.eval()
    assert direct_greedy(model, tok, prompt, 14) == "fox 7\nQuestion"
    metrics = task.evaluate(model, tok, SETTINGS, progress=False)
    assert metrics["muse/knowmem_forget"] == pytest.approx(100.0)
    assert metrics["muse/knowmem_retain"] < 50.0


def test_privleak_with_auc_retrain(tiny, data: Path) -> None:
    model, tok = tiny
    task = load(data, auc_retrain=0.4, **FAST)
    metrics = task.evaluate(model, tok, SETTINGS, progress=False)
    assert metrics["muse/privleak_auc_retrain"] == 0.4
    assert metrics["muse/privleak"] == pytest.approx((metrics["muse/privleak_auc"] - 0.4) / 0.4 * 100)
    assert not any("PrivLeak needs" in n for n in task.notes)


def test_privleak_absent_without_a_retrained_reference(tiny, data: Path) -> None:
    model, tok = tiny
    task = load(data, **FAST)
    metrics = task.evaluate(model, tok, SETTINGS, progress=False)
    assert "muse/privleak" not in metrics and "muse/privleak_auc_retrain" not in metrics
    assert "muse/privleak_auc" in metrics
    assert any("PrivLeak needs benchmark.auc_retrain or benchmark.retrain_model" in n for n in task.notes)


def test_privleak_with_retrain_model(tiny, data: Path, tiny_model_dir: Path, monkeypatch) -> None:
    import unlearn.compute.models

    calls: list[str] = []
    real = unlearn.compute.models.load_model

    def counting(spec: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(unlearn.compute.models, "load_model", counting)
    model, tok = tiny  # the same weights as tiny_model_dir: the "retrained" model is this model
    task = load(data, retrain_model=str(tiny_model_dir), **FAST)
    first = task.evaluate(model, tok, SETTINGS, progress=False)
    assert first["muse/privleak_auc_retrain"] == pytest.approx(first["muse/privleak_auc"])
    assert first["muse/privleak"] == pytest.approx(0.0, abs=1e-6)
    second = task.evaluate(model, tok, SETTINGS, progress=False)
    assert second["muse/privleak_auc_retrain"] == first["muse/privleak_auc_retrain"]
    assert calls == [str(tiny_model_dir)]  # loaded once, cached on the task


# ---------------------------------------------------------------------------------------------- hub


class FakeSplit:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def to_list(self) -> list[dict[str, Any]]:
        return self.rows


def test_hub_names_subsets_and_retain2_fallback(monkeypatch) -> None:
    import datasets

    tables = {("raw", "forget"): [{"text": text(8)}], ("raw", "retain1"): [{"text": text(3)}],
              ("knowmem", "forget_qa"): qa("f", 2), ("knowmem", "retain2_qa"): qa("r", 2),  # MUSE-Books' naming
              ("knowmem", "forget_qa_icl"): qa("fi", 1), ("knowmem", "retain2_qa_icl"): qa("ri", 1),
              ("verbmem", "forget"): [{"prompt": "p", "gt": "g"}],
              ("privleak", "forget"): [{"text": "a b"}], ("privleak", "holdout"): [{"text": "c d"}]}
    seen: list[tuple[str, str, str]] = []

    def fake(repo: str, subset: str, split: str) -> FakeSplit:
        seen.append((repo, subset, split))
        if (subset, split) not in tables:
            raise ValueError(f'Unknown split "{split}". Should be one of [...]')
        return FakeSplit(tables[(subset, split)])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    task = load_task({"name": "muse", "data": "books", "chunk_words": 4})
    assert {r for r, _, _ in seen} == {"muse-bench/MUSE-Books"}
    assert [e.target for e in task.forget] == chunk_texts([text(8)], 4)
    assert task.knowmem["retain"] == [("What is r 0?", "r 0 is alpha"), ("What is r 1?", "r 1 is beta")]
    assert task.icl["retain"] == [("What is ri 0?", "ri 0 is alpha")] and task.verbmem == [("p", "g")]
    same = load_task({"name": "muse", "data": "muse-bench/MUSE-Books", "chunk_words": 4})
    assert same.fingerprint == task.fingerprint
    tables[("verbmem", "forget")] = [{"prompt": "p", "gt": "other"}]
    assert load_task({"name": "muse", "data": "books", "chunk_words": 4}).fingerprint != task.fingerprint


def test_hub_unreachable_is_one_line(monkeypatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'muse-bench/MUSE-Nope' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for data in ("news", "muse-bench/MUSE-Nope"):
        with pytest.raises(UserError) as err:
            load_task({"name": "muse", "data": data})
        message = str(err.value)
        assert "\n" not in message and "hub could not be reached" in message and "local directory" in message


# ---------------------------------------------------------------------------------------------- malformed


def test_missing_data_and_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"benchmark 'muse' needs data: pass --data DIR \(MUSE layout\)"):
        load_task({"name": "muse"})
    with pytest.raises(UserError, match="not a directory"):
        load_task({"name": "muse", "data": str(tmp_path / "nowhere" / "deep")})
    with pytest.raises(UserError, match="unknown key.*auc_retain"):
        load_task({"name": "muse", "data": str(tmp_path), "auc_retain": 0.5})


@pytest.mark.parametrize(("config", "message"), [
    ({"k_percent": 0}, "k_percent"), ({"auc_retrain": 0}, "auc_retrain"), ({"chunk_words": 0}, "chunk_words"),
    ({"limit": True}, "limit"), ({"forget": "../raw/forget"}, "SUBSET/SPLIT"), ({"sequential": "yes"}, "sequential"),
    ({"sequential": True, "forget": "scal/forget_1"}, "conflict")])
def test_bad_settings(data: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        load(data, **config)


def test_missing_file_is_named(data: Path) -> None:
    (data / "verbmem" / "forget.json").unlink()
    with pytest.raises(UserError) as err:
        load(data)
    assert str(err.value).startswith(str(data / "verbmem" / "forget.json") + ": file not found")
    layout(data)
    (data / "raw" / "retain1.txt").unlink()  # only unlearning reads raw text: `unlearn run` names it
    task = load(data)
    assert task.forget == [] and task.training_hint.startswith("MUSE's unlearning text raw/retain1 was not found")


@pytest.mark.parametrize(("subpath", "content", "message"), [
    ("verbmem/forget.json", [{"prompt": "a", "gt": "b"}, {"prompt": "c"}], "record 2: missing field 'gt'"),
    ("knowmem/retain_qa.json", [{"question": "q", "answer": 3}], "record 1: field 'answer' must be a non-empty"),
    ("privleak/holdout.json", ["ok", {"txt": "x"}], "record 2: missing field 'text'"),
    ("privleak/forget.json", {"text": "x"}, "expected a JSON list"),
])
def test_malformed_record_names_file_record_and_field(data: Path, subpath: str, content: Any, message: str) -> None:
    (data / subpath).write_text(json.dumps(content))
    with pytest.raises(UserError) as err:
        load(data)
    assert str(err.value).startswith(str(data / subpath)) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_sequential_without_sust_and_ambiguous_files(tmp_path: Path) -> None:
    data = layout(tmp_path / "m", sust=None)
    with pytest.raises(UserError, match="sust/forget_1"):
        load(data, sequential=True)
    (data / "raw" / "forget.json").write_text(json.dumps(["x"]))
    with pytest.raises(UserError, match="both forget.txt and forget.json"):
        load(data)


def test_writer_layout(data: Path) -> None:
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
    assert files == ["knowmem/forget_qa.json", "knowmem/forget_qa_icl.json", "knowmem/retain_qa.json",
                     "knowmem/retain_qa_icl.json", "privleak/forget.json", "privleak/holdout.json",
                     "privleak/retain.json", "raw/forget.txt", "raw/holdout.txt", "raw/retain1.txt",
                     "raw/retain2.txt", "scal/forget_1.txt", "scal/forget_2.txt", "sust/forget_1.txt",
                     "sust/forget_10.txt", "sust/forget_2.txt", "verbmem/forget.json"]
    assert json.loads((data / "privleak" / "forget.json").read_text())[0] == text(10)
    assert (data / "raw" / "forget.txt").read_text() == text(12) + "\n\n" + text(7, 3)
