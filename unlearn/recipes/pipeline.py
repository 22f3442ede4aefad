"""The flow in one page: benchmark -> starting model -> unlearn (one or more requests) -> save -> evaluate.

Each stage writes into the run folder, which is staged and renamed into place only at the end
(unlearn/runs.py), so any failure leaves nothing behind that looks like a finished run.
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn.adapters import add_lora
from unlearn.benchmarks import BENCHMARKS
from unlearn.config import RunConfig
from unlearn.data import encode
from unlearn.errors import UserError
from unlearn.evaluate import collect_samples
from unlearn.files import write_json_atomic, write_jsonl_atomic, write_yaml
from unlearn.models import load_model, save_model
from unlearn.objectives import Objective, build_objective
from unlearn.optim import OPTIMIZERS, build_optimizer, dry_build
from unlearn.recipes.prepare import baseline_metrics, target_model
from unlearn.results import RunRecord
from unlearn.runs import open_run_dir, staged_dir
from unlearn.task import Stage, Task
from unlearn.train import train


@dataclass
class RunOutcome:
    run_dir: Path
    record: RunRecord  # what metrics.json holds


def load_task(benchmark: dict[str, Any]) -> Task:
    return BENCHMARKS.lookup(benchmark.get("name", "embedded"))(benchmark)


def _build(builder, name: str, *args, **options):
    try:
        return builder(name, *args, **options)
    except ValueError as err:
        raise UserError(str(err)) from None


def starting_model(cfg: RunConfig, task: Task, progress: bool = True, trust_remote_code: bool = False) -> str:
    """The model unlearning starts from. On the embedded benchmark that is the target model (the base model
    fine-tuned to know the facts); on real benchmarks it is the model as given."""
    if not task.needs_target:
        return cfg.model
    return str(target_model(cfg.model, task, cfg.benchmark.get("prepare", {}),
                            trust_remote_code=trust_remote_code, progress=progress) / "model")


def _describe(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


def _optimizer_options(cfg: RunConfig) -> dict[str, Any]:
    options = dict(cfg.optimizer_options)
    cls = OPTIMIZERS.get(cfg.optimizer["name"])
    if cls is not None and "total_steps" in inspect.signature(cls).parameters:
        options.setdefault("total_steps", cfg.train.max_steps)  # schedules that must end on a phase
    return options


def _optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return _build(build_optimizer, cfg.optimizer["name"], model.named_parameters(), **_optimizer_options(cfg))


def check_run_config(cfg: RunConfig) -> tuple[Task, Objective]:
    """Everything a run's settings can get wrong, found in seconds, before any model is loaded: the method and
    its options, the optimizer and its options (built on stand-in tensors), the benchmark and its data.
    Returns the task and the objective, both ready for the run."""
    objective = _build(build_objective, cfg.method["name"], **cfg.method_options)
    _build(dry_build, cfg.optimizer["name"], _optimizer_options(cfg))
    task = load_task(cfg.benchmark)
    if not task.forget:
        raise UserError(f"benchmark '{task.name}' gives no forget text to unlearn"
                        + (f": {task.training_hint}" if task.training_hint else ""))
    return task, objective


def _unlearn_request(cfg: RunConfig, objective, model: torch.nn.Module, tok, forget_examples, retain,
                     log_path: Path, desc: str, progress: bool) -> tuple[torch.nn.Module, Any]:
    """One unlearning request: objective set-up on the current model, optional LoRA (merged at the end, so
    a following request starts from plain weights), a fresh optimizer, training."""
    objective.trainable(model)
    forget = [encode(tok, ex) for ex in forget_examples]
    objective.prepare(model, forget, retain, tok.pad_token_id, cfg.eval.batch_size)
    if cfg.train.lora_rank:
        try:
            model = add_lora(model, cfg.train.lora_rank)
        except ValueError as err:
            raise UserError(str(err)) from None
    optimizer = _optimizer(cfg, model)
    result = train(model, objective, optimizer, forget, retain, pad_id=tok.pad_token_id,
                   batch_size=cfg.train.batch_size, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                   log_path=log_path, desc=desc, progress=progress)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, result


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True, log=print,
        trust_remote_code: bool = False, log_samples: bool = False) -> RunOutcome:
    """`trust_remote_code` comes from the command-line flag only: it is never a config setting (see config.py)."""
    task, objective = check_run_config(cfg)
    for note in task.notes:
        log(f"note: {note}")
    name = cfg.name or f"{cfg.method['name']}-{cfg.optimizer['name']}"
    # The run folder is claimed before minutes of model loading: a second run on the same name is refused now.
    with open_run_dir(Path(cfg.output_dir), name, overwrite) as (final, notes):
        for note in notes:
            log(f"note: {note}")
        return _run(cfg, task, objective, final, overwrite, progress, log, trust_remote_code, log_samples)


def _run(cfg: RunConfig, task: Task, objective: Objective, final: Path, overwrite: bool, progress: bool, log,
         trust_remote_code: bool, log_samples: bool) -> RunOutcome:
    torch.manual_seed(cfg.train.seed)
    start_spec = starting_model(cfg, task, progress, trust_remote_code)
    loaded = load_model(start_spec, trust_remote_code=trust_remote_code)
    target_metrics = baseline_metrics(start_spec, task, cfg.eval, progress=progress, loaded=loaded)
    log(f"starting model: {start_spec}  ({_describe(target_metrics, task.forget_metrics)})")
    model, tok = loaded.model, loaded.tokenizer
    retain = [encode(tok, ex) for ex in task.retain]

    requests = task.stages or [Stage("forget", task.forget)]
    stages: list[dict[str, Any]] = []
    with staged_dir(final, overwrite=overwrite, claimed=True) as stage_dir:
        config = cfg.to_dict() | {"name": final.name, "target_model": start_spec}
        write_yaml(stage_dir / "config.yaml", config)
        seconds, forwards, steps = 0.0, 0, 0
        eval_seconds = 0.0
        for index, request in enumerate(requests):
            sequential = len(requests) > 1
            log_path = stage_dir / (f"log-{index + 1}-{request.name}.jsonl" if sequential else "log.jsonl")
            desc = f"unlearning {request.name} ({index + 1}/{len(requests)})" if sequential else "unlearning"
            model, result = _unlearn_request(cfg, objective, model, tok, request.forget, retain, log_path, desc,
                                             progress)
            seconds, forwards, steps = seconds + result.seconds, forwards + result.forward_passes, steps + result.steps
            started = time.perf_counter()
            with collect_samples() if log_samples else nullcontext([]) as samples:
                metrics = task.evaluate(model, tok, cfg.eval, progress=progress)
            eval_seconds += time.perf_counter() - started
            stages.append({"stage": request.name, "steps": result.steps, "final_loss": result.final_loss,
                           "metrics": metrics})
            if sequential:
                log(f"after request {index + 1}/{len(requests)} ({request.name}): "
                    f"{_describe(metrics, task.forget_metrics)}")
        if log_samples:  # the final evaluation's items: what metrics.json summarizes
            write_jsonl_atomic(stage_dir / "samples.jsonl", samples)
        save_model(model, tok, stage_dir / "model")
        train_info = {"steps": steps, "seconds": round(seconds, 1), "forward_passes": forwards,
                      "final_loss": result.final_loss, "eval_seconds": round(eval_seconds, 1)}
        record = RunRecord(method=cfg.method["name"], optimizer=cfg.optimizer["name"], benchmark=task.name,
                           headline=task.headline, metrics=metrics, declared=list(task.metrics), train=train_info,
                           target=target_metrics, notes=task.notes, stages=stages if len(requests) > 1 else None)
        write_json_atomic(stage_dir / "metrics.json", record.to_json())
    return RunOutcome(run_dir=final, record=record)
