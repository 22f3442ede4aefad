"""The flow in one page: benchmark -> starting model -> unlearn (one or more requests) -> save -> evaluate.

Each stage writes into the run folder, which is staged and renamed into place only at the end
(unlearn/storage/runs.py), so any failure leaves nothing behind that looks like a finished run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from unlearn.compute.distributed import World, gathered_model, shard_model
from unlearn.compute.models import enable_gradient_checkpointing, load_model, save_model
from unlearn.compute.placement import CPU_FP32, Placement, parse_dtype
from unlearn.compute.placement import resolve as resolve_placement
from unlearn.core.errors import UserError, shown
from unlearn.core.files import write_json_atomic, write_jsonl_atomic, write_yaml
from unlearn.core.settings import setting_names
from unlearn.evaluation.collapse import collapse_reasons, collapse_warning
from unlearn.evaluation.measures import evaluate_items
from unlearn.optim.protocol import OPTIMIZERS, accepts, build_optimizer, dry_build, rounds_updates
from unlearn.optim.rounding import use_precision
from unlearn.recipes.prepare import baseline_cached, baseline_metrics, target_model
from unlearn.storage import checkpoints
from unlearn.storage.checkpoints import Checkpoint
from unlearn.storage.records import ITEMS_FILE, RunRecord
from unlearn.storage.runs import check_name, open_run_dir, partial_dir, staged_dir
from unlearn.storage.tracking import RunTracker, check_report_to, tracking
from unlearn.tasks.data import Encoded, Example, encode, rows_used
from unlearn.tasks.task import Stage, Task, load_task
from unlearn.training.adapters import add_lora, merge_lora
from unlearn.training.config import RunConfig, load_run_config
from unlearn.training.loop import Monitor, Progress, check_batching, retain_seed, train
from unlearn.training.methods import METHODS, Method, build_method
from unlearn.training.stopping import StopRule


@dataclass
class RunOutcome:
    run_dir: Path
    record: RunRecord  # what metrics.json holds


def _build(builder, name: str, *args, **options):
    try:
        return builder(name, *args, **options)
    except ValueError as err:
        raise UserError(str(err)) from None


def starting_model(cfg: RunConfig, task: Task, progress: bool = True, trust_remote_code: bool = False,
                   placement: Placement = CPU_FP32) -> str:
    """The model unlearning starts from. On the embedded benchmark that is the target model (the base model
    fine-tuned to know the facts); on real benchmarks it is the model as given."""
    if not task.needs_target:
        return cfg.model
    return str(target_model(cfg.model, task, cfg.benchmark.get("prepare", {}), trust_remote_code=trust_remote_code,
                            progress=progress, placement=placement.for_training(True)) / "model")


def base_model_metrics(cfg: RunConfig, task: Task, progress: bool, trust_remote_code: bool, placement: Placement,
                       log=print) -> dict[str, float] | None:
    """The base model's metrics before it was taught the facts (benchmarks that prepare a target), cached like
    every baseline and measured before the starting model loads (never two models in memory at once)."""
    if not task.needs_target:
        return None
    metrics, _ = baseline_metrics(cfg.model, task, cfg.eval, trust_remote_code=trust_remote_code,
                                  progress=progress, placement=placement.for_training(True))
    log(f"base model: {cfg.model}  ({_describe(metrics, task.forget_metrics)}; before preparation)")
    return metrics


def _describe(metrics: dict[str, float], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))


def _optimizer_options(cfg: RunConfig) -> dict[str, Any]:
    options = dict(cfg.optimizer_options)
    cls = OPTIMIZERS.get(cfg.optimizer["name"])
    if cls is not None and accepts(cls, "total_steps"):
        options.setdefault("total_steps", cfg.train.max_steps)  # schedules that must end on a phase
    return options


def _seeded_spec(spec: Any, seed: int, accepts_seed: Callable[[str], bool]) -> Any:
    if not isinstance(spec, dict) or "seed" in spec or not isinstance(spec.get("name"), str):
        return spec
    return {**spec, "seed": seed} if accepts_seed(spec["name"]) else spec


def seeded(cfg: RunConfig) -> RunConfig:
    """Every random stream of the run drawn from `train.seed` (data order and LoRA init already are) unless its
    own seed is given: the optimizer's directions (`optimizer.seed`, a hybrid's `optimizer.zo.seed`) and the
    method's (RMU's random control vector, `method.seed`). The result is what config.yaml records, so a second
    seed of a run is a second seed of every stream. The benchmark's world (`benchmark.seed`) is not a run
    stream: it defines the facts, and every run of a comparison must share them."""
    seed = cfg.train.seed

    def optimizer_takes(name: str) -> bool:
        cls = OPTIMIZERS.get(name)
        return cls is not None and accepts(cls, "seed")

    def method_takes(name: str) -> bool:
        cls = METHODS.get(name)
        return cls is not None and "seed" in setting_names(cls)

    optimizer = _seeded_spec(cfg.optimizer, seed, optimizer_takes)
    optimizer = {k: _seeded_spec(v, seed, optimizer_takes) if k in ("fo", "zo") else v for k, v in optimizer.items()}
    return replace(cfg, optimizer=optimizer, method=_seeded_spec(cfg.method, seed, method_takes))


def _optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return _build(build_optimizer, cfg.optimizer["name"], model.named_parameters(), **_optimizer_options(cfg))


def check_run_config(cfg: RunConfig) -> tuple[Task, Method]:
    """Everything a run's settings can get wrong, found in seconds, before any model is loaded: the method and
    its options, the optimizer and its options (built on stand-in tensors), the benchmark and its data.
    Returns the task and the method, both ready for the run."""
    check_report_to(cfg.report_to)  # its optional package: a missing one is said before anything is built
    method = _build(build_method, cfg.method["name"], **cfg.method_options)
    _build(dry_build, cfg.optimizer["name"], _optimizer_options(cfg))
    check_method_fits(cfg, method)
    task = load_task(cfg.benchmark)
    if not task.forget:
        raise UserError(f"benchmark '{task.name}' gives no forget text to unlearn"
                        + (f": {task.training_hint}" if task.training_hint else ""))
    return task, method


def check_method_fits(cfg: RunConfig, method: Method) -> None:
    """What the method declares it needs (unlearn.training.methods.base.Method) against the run's other settings."""
    name = cfg.method["name"]
    if method.needs_gradients and not getattr(OPTIMIZERS.lookup(cfg.optimizer["name"]), "uses_gradients", True):
        raise UserError(f"method '{name}' differentiates its own loss (its ascent step needs the forget gradient); "
                        f"optimizer '{cfg.optimizer['name']}' computes no gradients: use a gradient grade or hybrid")
    if method.shifts_weights and cfg.train.gradient_checkpointing:
        raise UserError(f"method '{name}' evaluates its forget loss at shifted weights, which gradient "
                        f"checkpointing would recompute without the shift: leave train.gradient_checkpointing off")
    if method.edits_after_training and cfg.train.stop_at is not None:
        raise UserError(f"method '{name}' edits the weights after its last step, so the probe during training "
                        f"measures a different model: train.stop_at cannot be used with it")


def _optimizer_names(cfg: RunConfig) -> list[str]:
    """The optimizer and, for a hybrid, its members."""
    return [cfg.optimizer["name"]] + [cfg.optimizer[k]["name"] for k in ("fo", "zo")
                                      if isinstance(cfg.optimizer.get(k), dict) and "name" in cfg.optimizer[k]]


def training_placement(cfg: RunConfig) -> Placement:
    """Device, compute dtype and precision for this run's optimizer (unlearn.compute.placement): `auto` precision is
    fp32 master weights for gradient grades, stochastically rounded bf16 weights for zeroth-order ones. A
    precision the optimizer cannot do is refused here, before any model loads."""
    gradients = bool(getattr(OPTIMIZERS.lookup(cfg.optimizer["name"]), "uses_gradients", True))
    placement = resolve_placement(cfg.train.device, cfg.train.dtype, cfg.train.precision).for_training(gradients)
    if placement.stochastic:
        for name in _optimizer_names(cfg):
            if not rounds_updates(OPTIMIZERS.lookup(name)):
                raise UserError(f"optimizer '{name}' cannot add stochastically rounded updates to bf16 weights "
                                f"(train.precision lean); use --precision master")
    return placement


def check_world(cfg: RunConfig, world: World, method: Method) -> None:
    """What several processes cannot do, said before any model loads."""
    check_batching(cfg.train.batch_size, cfg.train.grad_accum, world)
    if not world.distributed:
        return
    for name in _optimizer_names(cfg):
        if not getattr(OPTIMIZERS.lookup(name), "data_parallel", True):
            raise UserError(f"optimizer '{name}' cannot run on several processes (its state is estimated per "
                            f"process); run it in one process, with train.grad_accum for the batch")
    if cfg.train.parallel == "fsdp":
        name = cfg.optimizer["name"]
        if not getattr(OPTIMIZERS.lookup(name), "sharded_parameters", False):
            able = ", ".join(n for n in OPTIMIZERS if getattr(OPTIMIZERS[n], "sharded_parameters", False))
            raise UserError(f"train.parallel=fsdp shards every parameter across processes; optimizer '{name}' needs "
                            f"whole parameters (zeroth-order perturbs them in place, spectral and sign grades "
                            f"see whole matrices): use {able}, or train.parallel=data")
        for what, refused in (("train.lora_rank", cfg.train.lora_rank), ("train.save_every", cfg.train.save_every),
                              (f"method '{cfg.method['name']}' (it keeps a frozen copy of the model)",
                               method.copies_model),
                              (f"method '{cfg.method['name']}' (it shifts whole parameters)", method.shifts_weights)):
            if refused:
                raise UserError(f"train.parallel=fsdp does not support {what} yet: use train.parallel=data")


@dataclass
class RunContext:
    """One run as its steps see it: the checked settings, the benchmark and the method, the claimed folder, where
    it runs, and how it reports. `trust_remote_code` comes from the command-line flag only, never a config."""

    cfg: RunConfig
    task: Task
    method: Method
    final: Path  # the run folder's final name (claimed; written only by the rename at the end)
    placement: Placement
    world: World
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    trust_remote_code: bool = False
    log_samples: bool = False

    @property
    def main(self) -> bool:
        return self.world.is_main

    @property
    def sharded(self) -> bool:
        """A sharded model's every forward is a collective: then all ranks evaluate, in lockstep (rank 0 writes)."""
        return self.cfg.train.parallel == "fsdp" and self.world.distributed

    @property
    def requests(self) -> list[Stage]:
        return self.task.stages or [Stage("forget", self.task.forget)]


@dataclass(frozen=True)
class Done:
    """What the finished requests took: the checkpoints' `done` record, typed (its JSON form is unchanged)."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    forward_passes: int = 0
    steps: int = 0
    eval_seconds: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Done:
        return cls(list(data["stages"]), float(data["seconds"]), int(data["forward_passes"]), int(data["steps"]),
                   float(data["eval_seconds"]))

    def to_json(self) -> dict[str, Any]:
        return {"stages": list(self.stages), "seconds": self.seconds, "forward_passes": self.forward_passes,
                "steps": self.steps, "eval_seconds": self.eval_seconds}


@dataclass
class _Resume:
    """Where an interrupted run continues: request `stage` (its start model in `stage_start` when > 0), after
    step `checkpoint.step` when a step checkpoint of that request exists; `done` is what the requests before it
    took."""

    stage: int
    done: Done
    checkpoint: Checkpoint | None
    stage_start: Checkpoint | None


def _resume_point(stage_dir: Path) -> _Resume | None:
    step, stage = checkpoints.latest(stage_dir), checkpoints.stage_start(stage_dir)
    if stage is not None and (step is None or stage.stage > step.stage):
        return _Resume(stage.stage, _done_of(stage), None, stage)
    if step is None:
        return None
    start = stage if stage is not None and stage.stage == step.stage else None
    return _Resume(step.stage, _done_of(step), step, start)


def _done_of(point: Checkpoint) -> Done:
    done = point.progress.get("done")
    return Done.from_json(done) if done is not None else Done()


def _truncate_log(path: Path, steps: int) -> None:
    """Keep the log lines of the steps a checkpoint covers: the steps after it are taken again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by the kill (or one nobody could have logged)
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= steps:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


@dataclass
class _Request:
    """One unlearning request's training inputs, beyond the run's own."""

    forget: list[Example]
    log_path: Path | None
    desc: str
    save: Callable[[torch.nn.Module, torch.optim.Optimizer, Progress], None] | None
    resume_from: Checkpoint | None
    on_record: Callable[[dict[str, Any]], None] | None = None  # each log record, for the run's tracker


def _unlearn_request(ctx: RunContext, model: torch.nn.Module, tok, retain: list[Encoded], max_length: int,
                     request: _Request) -> tuple[torch.nn.Module, Any]:
    """One unlearning request: method set-up on the current model, optional LoRA (merged at the end, so
    a following request starts from plain weights), a fresh optimizer, training (from a checkpoint when
    resuming), measuring the benchmark's probe every train.eval_every steps."""
    cfg, method, placement = ctx.cfg, ctx.method, ctx.placement
    method.trainable(model)
    forget = method.encode_forget(tok, request.forget, max_length)
    # The training loop's own retain stream: what it will draw, and nothing more.
    used = rows_used(len(retain), cfg.train.batch_size, retain_seed(cfg.train.seed), cfg.train.max_steps) \
        if retain else None
    method.prepare(model, forget, retain, tok.pad_token_id, cfg.eval.batch_size, retain_used=used)
    if cfg.train.lora_rank:
        try:
            model = add_lora(model, cfg.train.lora_rank)
        except ValueError as err:
            raise UserError(str(err)) from None
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = _optimizer(cfg, model)
    try:
        use_precision(optimizer, placement, cfg.train.seed, model)  # the names were checked: training_placement
    except ValueError as err:
        raise UserError(f"train.precision lean: {err}") from None
    start = Progress()
    if request.resume_from is not None:
        checkpoints.restore(request.resume_from, model, optimizer)
        done = request.resume_from.progress["train"]
        start = Progress(request.resume_from.step, float(done["seconds"]), int(done["forward_passes"]),
                         float(done["final_loss"]))
        if request.log_path is not None:
            _truncate_log(request.log_path, start.steps)
    save = request.save
    result = train(model, method, optimizer, forget, retain, pad_id=tok.pad_token_id,
                   batch_size=cfg.train.batch_size, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                   log_path=request.log_path, desc=request.desc, progress=ctx.progress and ctx.main,
                   grad_accum=cfg.train.grad_accum, world=ctx.world, start=start,
                   checkpoint=(lambda done: save(model, optimizer, done)) if save else None,
                   checkpoint_every=cfg.train.save_every, monitor=_monitor(ctx, model, tok),
                   max_unchanged=cfg.train.max_unchanged, rounded=placement.stochastic,
                   on_record=request.on_record)
    model = merge_lora(model, cfg.train.seed if placement.stochastic else None)
    method.finish(model)
    return model, result


def _monitor(ctx: RunContext, model: torch.nn.Module, tok) -> Monitor | None:
    """The benchmark's quick probe every train.eval_every steps (and train.stop_at checked on it), if asked for."""
    cfg = ctx.cfg
    if not cfg.train.eval_every:
        return None

    def measure() -> dict[str, float]:
        training = model.training
        try:
            return ctx.task.probe(model, tok, cfg.eval)
        finally:
            model.train(training)

    return Monitor(cfg.train.eval_every, measure,
                   StopRule.parse(cfg.train.stop_at) if cfg.train.stop_at is not None else None, cfg.train.eval_delay)


def resumed_config(name: str, output_dir: str | None, report_to: str | None = None) -> RunConfig:
    """The settings an interrupted run saved in its partial folder (its output folder: the one it is found in)."""
    check_name(name)
    parent = Path(output_dir or "runs")
    saved = partial_dir(parent / name) / "config.yaml"
    if not saved.is_file():
        raise UserError(f"nothing to resume: no interrupted run {shown(name)} under {parent} "
                        "(a run leaves one when train.save_every > 0)")
    # report_to may change: it says how the run is watched, not what it computes
    return load_run_config(None, None, saved, {"output_dir": str(parent), "name": name, "report_to": report_to})


def run(cfg: RunConfig, overwrite: bool = False, progress: bool = True, log=print,
        trust_remote_code: bool = False, log_samples: bool = False, resume: bool = False) -> RunOutcome | None:
    """`trust_remote_code` comes from the command-line flag only: it is never a config setting (see config.py).
    Under a launcher every process trains; only rank 0 claims the folder, evaluates and writes, and only it
    returns the outcome (the others return None). `resume`: continue the interrupted run `cfg.name`."""
    cfg = seeded(cfg)
    task, method = check_run_config(cfg)
    placement = training_placement(cfg)
    world = World.from_env(placement.device)
    ctx = RunContext(cfg, task, method, Path(), placement, world, overwrite, resume, progress, log, trust_remote_code,
                     log_samples)
    try:
        return _claim_and_run(ctx)
    finally:
        world.close()  # leaves the launcher's process group (a local call: safe after an error too)


def _claim_and_run(ctx: RunContext) -> RunOutcome | None:
    cfg, world, log = ctx.cfg, ctx.world, ctx.log
    check_world(cfg, world, ctx.method)
    if not world.is_main:
        final = Path(str(world.broadcast_object(None)))
        _run(replace(ctx, final=final, progress=False, log=lambda *_: None))
        return None
    for note in ctx.task.notes:
        log(f"note: {note}")
    name = cfg.name or f"{cfg.method['name']}-{cfg.optimizer['name']}"
    # The run folder is claimed before minutes of model loading: a second run on the same name is refused now.
    with open_run_dir(Path(cfg.output_dir), name, ctx.overwrite, resume=ctx.resume) as (final, notes):
        world.broadcast_object(str(final))
        for note in notes:
            log(f"note: {note}")
        if cfg.train.save_every and not ctx.resume:
            log(f"note: checkpoints every {cfg.train.save_every} steps; if this run stops, `unlearn run --resume "
                f"{final.name}" + (f" --output-dir {cfg.output_dir}" if cfg.output_dir != "runs" else "")
                + "` continues it")
        if world.distributed:
            log(f"{world.size} processes, {ctx.placement.describe()} each; batch {cfg.train.batch_size} in "
                f"{cfg.train.grad_accum * world.size} shards per step")
        return _run(replace(ctx, final=final))


@dataclass
class _Start:
    """The loaded starting model and what was measured on it (and on the base model) before unlearning."""

    spec: str
    model: torch.nn.Module
    tokenizer: Any
    metrics: dict[str, float]
    items: dict[str, list[float]]
    base_metrics: dict[str, float] | None


def _load_start(ctx: RunContext) -> _Start:
    """The starting model, loaded where the run trains, with its baseline metrics (measured once and cached)."""
    cfg, task, placement, world, main = ctx.cfg, ctx.task, ctx.placement, ctx.world, ctx.main
    if main:  # rank 0 prepares (and caches) the starting model; the others then find it in the cache
        spec = starting_model(cfg, task, ctx.progress, ctx.trust_remote_code, placement)
    base_metrics = base_model_metrics(cfg, task, ctx.progress, ctx.trust_remote_code, placement, ctx.log) \
        if main else None
    world.barrier()
    if not main:
        spec = starting_model(cfg, task, False, ctx.trust_remote_code, placement)
    # Sharded: each rank reads the weights into CPU memory, and FSDP moves only its slices to the device.
    loaded = load_model(spec, trust_remote_code=ctx.trust_remote_code,
                        placement=Placement(torch.device("cpu"), placement.dtype) if ctx.sharded else placement)
    if ctx.sharded:
        loaded.model = shard_model(loaded.model, placement.device)
    metrics: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    cached = world.broadcast_object(baseline_cached(spec, task, cfg.eval, placement)) if ctx.sharded else False
    if main or (ctx.sharded and not cached):
        metrics, items = baseline_metrics(spec, task, cfg.eval, progress=ctx.progress and main, loaded=loaded,
                                          placement=placement, store=main)
        ctx.log(f"starting model: {spec}  ({_describe(metrics, task.forget_metrics)}; {placement.describe()}"
                f"{', sharded over ' + str(world.size) + ' processes' if ctx.sharded else ''})")
    return _Start(spec, loaded.model, loaded.tokenizer, metrics, items, base_metrics)


@dataclass
class _Unlearned:
    """The model after every request, what they took, and the last evaluation (with its per-item values)."""

    model: torch.nn.Module
    done: Done
    final_loss: float
    metrics: dict[str, float]
    items: dict[str, list[float]]
    samples: list[dict[str, Any]]


def _unlearn_all(ctx: RunContext, stage_dir: Path, point: _Resume | None, start: _Start,
                 tracker: RunTracker | None = None) -> _Unlearned:
    """Every unlearning request in turn, each evaluated after it; resumable at a request's start or a step."""
    cfg, task, main, requests = ctx.cfg, ctx.task, ctx.main, ctx.requests
    model, tok = start.model, start.tokenizer
    max_length = cfg.train.max_length or task.train_max_length
    retain = [encode(tok, ex, max_length=max_length) for ex in task.retain]
    resumable = cfg.train.save_every > 0
    done = point.done if point is not None else Done()
    metrics: dict[str, float] = done.stages[-1]["metrics"] if done.stages else {}
    items: dict[str, list[float]] = {}
    samples: list[dict[str, Any]] = []
    final_loss = done.stages[-1]["final_loss"] if done.stages else float("nan")
    first = point.stage if point else 0
    if point is not None and point.stage_start is not None:
        checkpoints.load_weights(model, point.stage_start.folder / "model.safetensors")
    for index, request in enumerate(requests):
        if index < first:
            continue
        sequential = len(requests) > 1
        log_path = stage_dir / (f"log-{index + 1}-{request.name}.jsonl" if sequential else "log.jsonl")
        before = done  # what the requests before this one took (a Done is replaced, never changed in place)
        resumed_here = point is not None and index == point.stage
        if main:  # watchable while it runs: one line per step, flushed, with the forget and retain parts
            ctx.log(f"training log (live): {log_path} (moves to {ctx.final}/ when the run completes)")
        if resumable and main and index > 0 and not resumed_here:
            checkpoints.save_stage_start(stage_dir, model, {"stage": index, "done": before.to_json()})

        def save(trained, optimizer, so_far: Progress, index=index, before=before) -> None:
            checkpoints.save(stage_dir, trained, optimizer, {
                "stage": index, "step": so_far.steps, "done": before.to_json(),
                "train": {"seconds": so_far.seconds, "forward_passes": so_far.forward_passes,
                          "final_loss": so_far.final_loss}})

        model, result = _unlearn_request(ctx, model, tok, retain, max_length, _Request(
            request.forget, log_path if main else None,
            f"unlearning {request.name} ({index + 1}/{len(requests)})" if sequential else "unlearning",
            save if resumable and main else None,
            point.checkpoint if resumed_here and point is not None else None,
            (lambda record, offset=before.steps: tracker.record(record, offset)) if tracker is not None else None))
        done = replace(done, seconds=done.seconds + result.seconds,
                       forward_passes=done.forward_passes + result.forward_passes, steps=done.steps + result.steps)
        final_loss = result.final_loss
        if not (main or ctx.sharded):
            continue  # rank 0 evaluates; the next request's training waits for it in its first collective
        started = time.perf_counter()
        metrics, items, samples = evaluate_items(lambda m=model: task.evaluate(m, tok, cfg.eval,
                                                                               progress=ctx.progress and main))
        done = replace(done, eval_seconds=done.eval_seconds + time.perf_counter() - started,
                       stages=[*done.stages, {"stage": request.name, "steps": result.steps,
                                              "final_loss": result.final_loss, "stopped_at": result.stopped_at,
                                              "metrics": metrics}])
        if sequential:
            ctx.log(f"after request {index + 1}/{len(requests)} ({request.name}): "
                    f"{_describe(metrics, task.forget_metrics)}")
    return _Unlearned(model, done, final_loss, metrics, items, samples)


def _record(ctx: RunContext, start: _Start, unlearned: _Unlearned) -> RunRecord:
    """What metrics.json says: the final metrics beside the starting model's, the training figures, collapse."""
    cfg, task, done = ctx.cfg, ctx.task, unlearned.done
    train_info = {"steps": done.steps, "seconds": round(done.seconds, 1), "forward_passes": done.forward_passes,
                  "final_loss": unlearned.final_loss, "eval_seconds": round(done.eval_seconds, 1),
                  "precision": ctx.placement.describe()}
    if cfg.train.stop_at is not None:
        # Whether the run reached the level it was to stop at (each request, for a sequential run): a run that
        # never did is reported as such, not compared as if it had.
        stops = [s.get("stopped_at") for s in done.stages]
        train_info |= {"stop_at": str(StopRule.parse(cfg.train.stop_at)), "stopped_at": stops[-1],
                       "reached": all(s is not None for s in stops)}
        if not train_info["reached"]:
            ctx.log(f"note: the run never met train.stop_at ({cfg.train.stop_at}) within {cfg.train.max_steps} steps")
    return RunRecord(method=cfg.method["name"], optimizer=cfg.optimizer["name"], benchmark=task.name,
                     headline=task.headline, metrics=unlearned.metrics, declared=list(task.metrics), train=train_info,
                     target=start.metrics, notes=task.notes, stages=done.stages if len(ctx.requests) > 1 else None,
                     collapse=collapse_reasons(unlearned.metrics, start.metrics, task.metrics,
                                               cfg.eval.collapse_ratio),
                     base=start.base_metrics)


def _run(ctx: RunContext) -> RunOutcome | None:
    """The run once its folder is claimed: load, unlearn every request, then (rank 0) write the run folder."""
    cfg, main = ctx.cfg, ctx.main
    torch.manual_seed(cfg.train.seed)
    start = _load_start(ctx)
    # The output folder's clean-up notes were said when the name was claimed (open_run_dir).
    staging = staged_dir(ctx.final, overwrite=ctx.overwrite, claimed=True, resumable=cfg.train.save_every > 0,
                         resume=ctx.resume, log=lambda _note: None) if main else nullcontext(partial_dir(ctx.final))
    # The tracker is closed before the staging folder is renamed into place (or removed): `with` exits right to left.
    with staging as stage_dir, tracking(cfg.report_to if main else "none", stage_dir, ctx.final.name,
                                        cfg.to_dict() | {"name": ctx.final.name}) as tracker:
        point = _resume_point(stage_dir) if ctx.resume else None
        if main:
            if point is not None:
                ctx.log(f"resuming {ctx.final.name}: request {point.stage + 1}/{len(ctx.requests)}, after step "
                        f"{point.checkpoint.step if point.checkpoint else 0}")
            write_yaml(stage_dir / "config.yaml", cfg.to_dict() | {"name": ctx.final.name, "target_model": start.spec})
        unlearned = _unlearn_all(ctx, stage_dir, point, start, tracker)
        model = gathered_model(unlearned.model, ctx.world) if ctx.sharded else unlearned.model  # rank 0: the whole
        if not main:
            ctx.world.barrier()  # rank 0 has saved the run
            return None
        assert model is not None
        if ctx.log_samples:  # the final evaluation's items: what metrics.json summarizes
            write_jsonl_atomic(stage_dir / "samples.jsonl", unlearned.samples)
        # Per-item values of the final and the starting model: what attack intervals and study statistics resample.
        write_json_atomic(stage_dir / ITEMS_FILE, {"unlearned": unlearned.items, "target": start.items})
        save_model(model, start.tokenizer, stage_dir / "model", dtype=parse_dtype(cfg.train.save_dtype))
        record = _record(ctx, start, unlearned)
        if record.collapsed:
            ctx.log(collapse_warning(record.collapse))
        write_json_atomic(stage_dir / "metrics.json", record.to_json())
        tracker.final(record.metrics, unlearned.done.steps)
    ctx.world.barrier()
    return RunOutcome(run_dir=ctx.final, record=record)
