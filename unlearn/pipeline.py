"""The flow in one page: benchmark -> target model -> unlearn -> save -> evaluate.

Each stage writes into the run folder, which is staged and renamed into place only at the end
(unlearn/runs.py), so any failure leaves nothing behind that looks like a finished run.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import BENCHMARKS
from benchmarks.embedded import TaskData
from benchmarks.prepare import prepare_record, target_model
from unlearn.adapters import add_lora
from unlearn.config import RunConfig
from unlearn.data import encode
from unlearn.errors import UserError
from unlearn.evaluate import evaluate
from unlearn.models import load_model, save_model
from unlearn.objectives import build_objective
from unlearn.optim import OPTIMIZERS, build_optimizer, check_options
from unlearn.runs import free_run_dir, staged_dir, write_json_atomic, write_yaml
from unlearn.train import train


@dataclass
class RunOutcome:
    run_dir: Path
    metrics: dict[str, float]
    target_metrics: dict[str, float]
    train: dict[str, Any]


def load_task(benchmark: dict[str, Any]) -> TaskData:
    name = benchmark.get("name", "embedded")
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{name}'; choose from: {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name](benchmark)


def _build(builder, name: str, *args, **options):
    try:
        return builder(name, *args, **options)
    except ValueError as err:
        raise UserError(str(err)) from None


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True, log=print) -> RunOutcome:
    # Fail on typos (method, optimizer, their options) before minutes of model preparation, not after.
    objective = _build(build_objective, cfg.method["name"], **cfg.method_options)
    _build(check_options, cfg.optimizer["name"], cfg.optimizer_options)
    lora_rank = cfg.train.lora_rank
    if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 0:
        raise UserError(f"train.lora_rank must be an integer >= 0 (0: no LoRA), got {lora_rank!r}")
    task = load_task(cfg.benchmark)
    torch.manual_seed(cfg.train.seed)

    target_dir = target_model(cfg.model, task, cfg.benchmark.get("prepare", {}),
                              trust_remote_code=cfg.trust_remote_code, progress=progress)
    target = prepare_record(target_dir)
    log(f"target model: {target_dir}/model  (forget {target['metrics']['forget/mcq_acc']:.2f}, "
        f"retain {target['metrics']['retain/mcq_acc']:.2f}, holdout {target['metrics']['holdout/mcq_acc']:.2f})")

    loaded = load_model(str(target_dir / "model"), trust_remote_code=cfg.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    objective.trainable(model)
    forget = [encode(tok, ex) for ex in task.forget]
    retain = [encode(tok, ex) for ex in task.retain]
    objective.prepare(model, forget, retain, tok.pad_token_id, cfg.eval.batch_size)
    if cfg.train.lora_rank:
        try:
            model = add_lora(model, cfg.train.lora_rank)
        except ValueError as err:
            raise UserError(str(err)) from None

    options = dict(cfg.optimizer_options)
    optimizer_cls = OPTIMIZERS[cfg.optimizer["name"]]
    if "total_steps" in inspect.signature(optimizer_cls).parameters:
        options.setdefault("total_steps", cfg.train.max_steps)  # schedules that must end on a phase
    optimizer = _build(build_optimizer, cfg.optimizer["name"], model.named_parameters(), **options)

    name = cfg.name or f"{cfg.method['name']}-{cfg.optimizer['name']}"
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = free_run_dir(output_dir, name, overwrite)
    with staged_dir(final, overwrite=overwrite) as stage:
        config = cfg.to_dict() | {"name": final.name, "target_model": str(target_dir / "model")}
        write_yaml(stage / "config.yaml", config)
        result = train(model, objective, optimizer, forget, retain, pad_id=tok.pad_token_id,
                       batch_size=cfg.train.batch_size, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                       log_path=stage / "log.jsonl", progress=progress)
        save_model(model, tok, stage / "model")
        started = time.perf_counter()
        metrics = evaluate(model, tok, task, cfg.eval.batch_size, cfg.eval.max_new_tokens, progress=progress)
        train_info = {"steps": result.steps, "seconds": round(result.seconds, 1),
                      "forward_passes": result.forward_passes, "final_loss": result.final_loss,
                      "eval_seconds": round(time.perf_counter() - started, 1)}
        write_json_atomic(stage / "metrics.json", {
            "method": cfg.method["name"], "optimizer": cfg.optimizer["name"], "benchmark": task.name,
            "metrics": metrics, "train": train_info, "target": target["metrics"]})
    return RunOutcome(run_dir=final, metrics=metrics, target_metrics=target["metrics"], train=train_info)
