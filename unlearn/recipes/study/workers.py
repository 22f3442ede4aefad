"""Running a study's jobs (each one run, a cell or a calibration trial, and the attacks on it): one after another in
this process, or several at once in worker processes.

Two processes of one thread each get more out of two CPU cores than one process of two threads does (its small
matrices leave cores idle): `python -m unlearn.perf.study_parallelism` measures it. Each worker gets its share of this
process's threads. Results do not depend on the order jobs finish in (every cell writes its own folder, renamed into
place whole), but a run's last digits may differ with the number of threads its matrix products were split over.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from unlearn.attacks.base import Attack
from unlearn.core.errors import UserError
from unlearn.core.registry import INCLUDED, include
from unlearn.recipes.attack import run_attack, subject_from_run
from unlearn.recipes.pipeline import run as run_pipeline
from unlearn.recipes.pipeline import starting_model
from unlearn.recipes.prepare import baseline_metrics
from unlearn.storage.records import read_run
from unlearn.tasks.task import load_task
from unlearn.training.config import RunConfig, read_yaml


@dataclass(frozen=True)
class JobAttack:
    label: str  # the study's label (in failures and logs)
    name: str  # the registered attack
    attack: Attack
    settings: Any
    folder: str  # its result folder under the run's attacks/


@dataclass(frozen=True)
class Job:
    where: str  # how the log names it: "[3/15] npo-adamw-s2"
    what: str
    cfg: RunConfig
    run_dir: Path
    attacks: tuple[JobAttack, ...] = ()
    attack_unmatched: bool = False  # attack a run that missed train.stop_at anyway


@dataclass(frozen=True)
class JobOptions:
    progress: bool = True
    trust_remote_code: bool = False


def _comparable(config: dict[str, Any]) -> str:
    """A run config as text without what a run records about itself (its folder, its target model's path, where it
    was watched: a run recorded before report_to existed, or watched another way, is the same run)."""
    kept = {k: v for k, v in config.items() if k not in ("name", "output_dir", "target_model", "report_to")}
    return json.dumps(yaml.safe_load(yaml.safe_dump(kept)), sort_keys=True)


def _check_unchanged(run_dir: Path, cfg: RunConfig) -> None:
    saved = read_yaml(run_dir / "config.yaml")
    if _comparable(saved) != _comparable(cfg.to_dict()):
        raise UserError(f"{run_dir} was run with other settings than the study now gives it; give the study another "
                        f"name, or move that folder away to run it again")


def _ensure_run(job: Job, options: JobOptions, failures: dict[str, str], log: Callable[[str], None]) -> bool:
    """The job's run complete (run now unless it already is); False if it failed (said in failures)."""
    if (job.run_dir / "metrics.json").is_file():
        _check_unchanged(job.run_dir, job.cfg)
        log(f"{job.where}: run complete, skipped")
        return True
    log(f"{job.where}: {job.what}")
    try:
        outcome = run_pipeline(job.cfg, progress=options.progress, log=lambda text: log("    " + text),
                               trust_remote_code=options.trust_remote_code)
    except UserError as err:  # this run cannot be made (e.g. its loss diverged); the others still can
        failures[job.run_dir.name] = str(err)
        log(f"{job.where}: failed: {err}")
        return False
    assert outcome is not None
    if outcome.run_dir != job.run_dir:
        raise UserError(f"{job.run_dir} is being written by another process; run one study at a time")
    return True


def run_job(job: Job, options: JobOptions, log: Callable[[str], None]) -> dict[str, str]:
    """The job's run and each of its attacks, complete ones skipped; what failed, by name."""
    failures: dict[str, str] = {}
    if not _ensure_run(job, options, failures, log) or not job.attacks:
        return failures
    if not job.attack_unmatched and read_run(job.run_dir / "metrics.json").train.get("reached") is False:
        log(f"{job.where}: never reached train.stop_at: not attacked (attack_unmatched: false)")
        return failures
    for attack in job.attacks:
        if (job.run_dir / "attacks" / attack.folder / "metrics.json").is_file():
            log(f"{job.where}: {attack.label} complete, skipped")
            continue
        log(f"{job.where}: attack {attack.label} ({attack.folder})")
        subject = subject_from_run(job.run_dir, trust_remote_code=options.trust_remote_code)
        try:
            run_attack(subject, attack.name, attack.attack, attack.settings, progress=options.progress)
        except UserError as err:
            failures[f"{job.run_dir.name} / {attack.label}"] = str(err)
            log(f"{job.where}: {attack.label} failed: {err}")
    return failures


def prepare_targets(configs: list[RunConfig], options: JobOptions, log: Callable[[str], None]) -> None:
    """Each distinct starting model the runs need (the embedded benchmark's target) built and its baseline
    evaluated, once, before workers start: otherwise every worker would build the same one at the same time."""
    from unlearn.recipes.pipeline import base_model_metrics, training_placement

    seen: set[str] = set()
    for cfg in configs:
        placement = training_placement(cfg)  # the cell's precision: its baseline is measured in it
        key = json.dumps([cfg.model, cfg.benchmark, cfg.eval.__dict__, cfg.train.device, cfg.train.dtype,
                          placement.mode], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        task = load_task(cfg.benchmark)
        if not task.needs_target:
            continue
        log(f"preparing the starting model for {cfg.model} on {task.name} (once, before the workers start)")
        spec = starting_model(cfg, task, options.progress, options.trust_remote_code, placement)
        base_model_metrics(cfg, task, options.progress, options.trust_remote_code, placement, log)
        baseline_metrics(spec, task, cfg.eval, options.trust_remote_code, options.progress, placement=placement)


def run_jobs(jobs: list[Job], options: JobOptions, log: Callable[[str], None], workers: int = 1) -> dict[str, str]:
    """Every job run; what failed, by name. A UserError a job does not catch itself (a cell run with other settings
    than the study's) ends them all, as does an interrupt: the workers are stopped, and what they left half-done
    is redone on the next start."""
    failures: dict[str, str] = {}
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            failures |= run_job(job, options, log)
        return failures
    import torch

    threads = max(1, torch.get_num_threads() // workers)
    log(f"{min(workers, len(jobs))} workers, {threads} CPU thread(s) each; progress bars off (lines only)")
    quiet = replace(options, progress=False)  # several processes' bars would overwrite each other
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(threads, list(INCLUDED))) as pool:
        futures = [pool.submit(_run_in_worker, job, quiet, _print) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:  # in job order; the first failure is raised here
                if future in done:
                    failures |= future.result()
        except BrokenProcessPool:
            _stop_workers(pool)
            raise UserError("a study worker ended abruptly (killed from outside, or out of memory); run the study "
                            "again to redo the cells it left") from None
        except BaseException:
            _stop_workers(pool)
            raise
    return failures


def _print(text: str) -> None:
    print(text, flush=True)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds the job, so its staging folders and locks are removed on the way out


STOPPED = 128 + signal.SIGTERM  # a worker's exit status once it has been stopped


def _run_in_worker(job: Job, options: JobOptions, log: Callable[[str], None]) -> dict[str, str]:
    """`run_job` in a worker, which ends with the job when it is stopped. The pool catches whatever a job raises,
    KeyboardInterrupt included, hands it back as that job's result and gives the worker the next queued cell: a
    stopped study then waited for those cells (a quarter of an hour each on Gemma) before it exited."""
    try:
        return run_job(job, options, log)
    except KeyboardInterrupt:
        # The job has unwound (its staging folders and locks are gone); nothing else of this process is needed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOPPED)


def _start_worker(threads: int, included: list[Path]) -> None:
    """A worker's setup: the parent alone answers Ctrl-C (and then stops the workers); its share of the threads;
    the components the parent's command line included (--include), so a cell may use them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupted)
    for path in included:
        include(path)
    import torch

    from unlearn.compute.models import quiet_transformers

    torch.set_num_threads(threads)
    quiet_transformers()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    for child in multiprocessing.active_children():
        child.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
