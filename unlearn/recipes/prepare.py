"""Turn a base model into the *target model*: one that knows the forget and retain facts.

Unlearning is only measurable if the model knew the facts to begin with, so we fine-tune the base
model on the forget + retain QA pairs and check MCQ accuracy: forget and retain should be high,
holdout (never trained on) near chance. The result is cached under
$UNLEARN_CACHE/targets/<hash of base model, benchmark content and settings>.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.compute.models import EMBEDDED, cache_dir, load_model, resolve, save_model
from unlearn.compute.placement import CPU_FP32, Placement
from unlearn.compute.placement import resolve as resolve_placement
from unlearn.core.files import read_json, read_text, write_json_atomic
from unlearn.core.settings import from_mapping
from unlearn.evaluation.measures import evaluate_items
from unlearn.optim.protocol import build_optimizer
from unlearn.optim.rounding import use_precision
from unlearn.storage.locks import claim
from unlearn.storage.runs import staged_dir
from unlearn.tasks.data import encode
from unlearn.tasks.task import Task, load_task
from unlearn.training.config import EvalConfig, load_run_config
from unlearn.training.loop import train
from unlearn.training.methods import LanguageModeling

PREPARE_VERSION = 1  # bump when the preparation recipe changes, to invalidate caches


def _model_identity(spec: str) -> str:
    """What the base weights are: the alias, or the folder's config and weight file stamps."""
    if spec in EMBEDDED:
        return spec
    path = Path(resolve(spec))
    if not path.is_dir():
        return spec  # hub id
    stamps = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.glob("*.safetensors"))
    return json.dumps({"path": str(path.resolve()), "config": read_text(path / "config.json", "model config"),
                       "weights": stamps})


# Prompts gained the BOS their tokenizer puts first (unlearn.tasks.data.bos_prefix). The embedded models' keys stay
# as they were: SmolLM2's tokenizer adds none, so its ids did not change, and Gemma's entries are new. Any other
# model's tokenizer may add one, so its cached targets and baselines, computed without it, are not reused.
ENCODING = 2


def _cache_key(spec: str, task: Task, **settings: Any) -> str:
    """Hash of what a cached result depends on: the model's identity, the data, the settings, the recipe."""
    encoding = {} if spec in EMBEDDED else {"encoding": ENCODING}
    blob = json.dumps({"model": _model_identity(spec), "task": task.fingerprint, **settings, **encoding,
                       "version": PREPARE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def target_key(spec: str, task: Task, settings: dict[str, Any]) -> str:
    return _cache_key(spec, task, prepare=settings)


def _precision(placement: Placement) -> dict[str, str]:
    """What a cache key adds for the precision: nothing in fp32 (so caches from before it was a setting stay)."""
    return {} if placement.dtype == torch.float32 else {"dtype": placement.dtype_name, "precision": placement.mode}


def target_model(spec: str, task: Task, settings: dict[str, Any], trust_remote_code: bool = False,
                 progress: bool = True, placement: Placement = CPU_FP32) -> Path:
    """Path of the cached target model folder (`model/` + `prepare.json`), building it if needed."""
    from unlearn.benchmarks.embedded import PrepareSettings

    # An embedded model's own defaults sit below the configured settings. configs/benchmark/embedded.yaml leaves
    # such keys out (they would always win over the model's); `test_embedded_models` checks that it does.
    defaults = EMBEDDED[spec].prepare if spec in EMBEDDED else {}
    given = settings if settings is not None else {}
    merged = {**defaults, **given} if isinstance(given, dict) else given  # from_mapping refuses a non-mapping
    checked = from_mapping(PrepareSettings, merged, "benchmark.prepare")
    epochs, lr, batch_size = checked.epochs, float(checked.lr), checked.batch_size
    folder = cache_dir() / "targets" / target_key(spec, task, {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                                               **_precision(placement)})
    if (folder / "prepare.json").is_file():
        return folder
    loaded = load_model(spec, trust_remote_code=trust_remote_code, placement=placement)
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    # The tied input/output embedding is a fifth of the weights; freezing it makes each step
    # cheaper, and the facts are learnable in the transformer blocks alone.
    model.get_input_embeddings().weight.requires_grad_(False)
    items = [encode(tok, ex) for ex in task.forget + task.retain]
    optimizer = build_optimizer("adamw", model.parameters(), lr=lr, weight_decay=0.0)
    use_precision(optimizer, placement, 0)
    steps = epochs * math.ceil(len(items) / batch_size)
    result = train(model, LanguageModeling(), optimizer, items, None, pad_id=tok.pad_token_id,
                   batch_size=batch_size, max_steps=steps, seed=0, desc="preparing target model",
                   progress=progress, rounded=placement.stochastic)
    model.get_input_embeddings().weight.requires_grad_(True)
    # The target's full metrics are cached with it: every run's table compares against them.
    metrics, items, _ = evaluate_items(lambda: task.evaluate(model, tok, EvalConfig(), progress=progress))
    record = {"base_model": spec, "task": task.name, "task_fingerprint": task.fingerprint,
              "epochs": epochs, "lr": lr, "batch_size": batch_size, "steps": steps,
              "seconds": round(result.seconds, 1), "final_loss": result.final_loss, "metrics": metrics}
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two runs may build the same target at once: the second waits for the first's write and keeps it (a run
    # may already be reading it), rather than replacing it with its own, identical, result.
    with claim(folder, wait=True):
        if (folder / "prepare.json").is_file():
            return folder
        with staged_dir(folder, overwrite=True, claimed=True, kind="target") as staging:
            save_model(model, tok, staging / "model")
            write_json_atomic(staging / "prepare.json", record)
    # Those are also the target's baseline under default evaluation settings: runs need not recompute them.
    _store_baseline(str(folder / "model"), task, EvalConfig(), metrics, items, placement)
    return folder


def prepare_record(folder: Path) -> dict[str, Any]:
    return read_json(folder / "prepare.json")


def baseline_cached(spec: str, task: Task, settings: EvalConfig, placement: Placement = CPU_FP32) -> bool:
    return _baseline_path(spec, task, settings, placement).is_file()


def baseline_metrics(spec: str, task: Task, settings: EvalConfig, trust_remote_code: bool = False,
                     progress: bool = True, loaded: Any = None, placement: Placement = CPU_FP32,
                     store: bool = True) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Metrics of the model as given (the starting point on real benchmarks) and their per-item values, cached
    per model, data and evaluation settings: every run from the same model compares against the same numbers,
    computed once. `loaded` is that model if the caller already holds it (it is loaded otherwise); `store`: cache
    the result."""
    path = _baseline_path(spec, task, settings, placement)
    if path.is_file():
        cached = read_json(path)
        return cached["metrics"], cached.get("items") or {}
    loaded = loaded or load_model(spec, trust_remote_code=trust_remote_code, placement=placement)
    metrics, items, _ = evaluate_items(lambda: task.evaluate(loaded.model, loaded.tokenizer, settings,
                                                             progress=progress))
    if store:  # under a launcher only rank 0 writes the cache
        _store_baseline(spec, task, settings, metrics, items, placement)
    return metrics, items


# Bumped whenever a metric's definition changes (2: MUSE as MUSE computes it, on its x100 scale; 3: MCQ Prob and
# per-item values): a cached baseline computed under an older definition must not sit in a table beside new numbers.
METRICS_VERSION = 3


def _baseline_path(spec: str, task: Task, settings: EvalConfig, placement: Placement) -> Path:
    key = _cache_key(spec, task, eval=settings.__dict__, metrics=METRICS_VERSION, **_precision(placement))
    return cache_dir() / "baselines" / f"{key}.json"


def _store_baseline(spec: str, task: Task, settings: EvalConfig, metrics: dict[str, float],
                    items: dict[str, list[float]], placement: Placement) -> None:
    path = _baseline_path(spec, task, settings, placement)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"model": spec, "task": task.name, "task_fingerprint": task.fingerprint,
                             "eval": settings.__dict__, "metrics": metrics, "items": items})


@dataclass
class Prepared:
    folder: Path  # the cached target: model/ and prepare.json
    record: dict[str, Any]  # prepare.json
    summary: dict[str, float]  # the benchmark's prepared_metrics, measured on the target


def prepare_target(model: str | None, flags: dict[str, Any], config_file: Path | None, overrides: list[str] | None,
                   trust_remote_code: bool = False, progress: bool = True) -> Prepared:
    """`unlearn prepare`: the configured benchmark's target model, built or found in the cache. Only the model, the
    benchmark and the training placement of the run settings matter here."""
    cfg = load_run_config(None, None, config_file, {"model": model, **flags}, overrides)
    task = load_task(cfg.benchmark)
    placement = resolve_placement(cfg.train.device, cfg.train.dtype, cfg.train.precision).for_training(True)
    folder = target_model(cfg.model, task, cfg.benchmark.get("prepare", {}), trust_remote_code, progress=progress,
                          placement=placement)
    record = prepare_record(folder)
    return Prepared(folder, record, {k: record["metrics"][k] for k in task.prepared_metrics if k in record["metrics"]})
