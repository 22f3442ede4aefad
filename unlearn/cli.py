"""`unlearn run | eval | report | prepare | models`.

User mistakes (UserError) end in one line on stderr and exit code 2; nothing half-written stays
on disk because every output is staged and renamed into place (unlearn/runs.py).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from unlearn.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LLM unlearning robustness toolkit: unlearn, attack, evaluate, report.")
console = Console()


def _fail(message: str, code: int) -> None:
    # Plain print, not rich: errors must stay on one line whatever the terminal width.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file merged over configs/run.yaml.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: train.max_steps=100.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _setup_torch() -> None:
    import torch

    # Deterministic CPU math and no oversubscription on small machines.
    torch.set_num_threads(int(os.environ.get("UNLEARN_THREADS", os.cpu_count() or 1)))
    from transformers.utils import logging as hf_logging

    # Our own progress bars say what is happening; per-tensor loading bars and advisory warnings
    # from transformers would bury them.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _markdown_table(rows) -> None:
    from benchmarks.report import markdown

    print(markdown(rows))  # plain print: rich would wrap table rows at the terminal width


@app.command()
def run(
    method: Annotated[str | None, typer.Option(help="Objective: npo, graddiff, gradascent, simnpo, rmu.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="Optimizer: adamw, sgd, signsgd, zo, hybrid.")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id, local HF folder, or smollm2-135m.")] = None,
    benchmark: Annotated[str | None, typer.Option(help="Benchmark (embedded).")] = None,
    steps: Annotated[int | None, typer.Option(help="Unlearning steps (train.max_steps).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (optimizer.lr).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (train.batch_size).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (train.seed).")] = None,
    name: Annotated[str | None, typer.Option(help="Run folder name (default METHOD-OPTIMIZER).")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Where run folders go (default runs).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder of the same name.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model repos to run their own code.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Unlearn the forget set from the target model, save it, evaluate it, print the table."""
    from benchmarks.report import row_from
    from unlearn.config import load_run_config
    from unlearn.pipeline import run as run_pipeline

    flags = {"model": model, "benchmark.name": benchmark, "train.max_steps": steps, "optimizer.lr": lr,
             "train.batch_size": batch_size, "train.seed": seed, "name": name, "output_dir": output_dir,
             "trust_remote_code": trust_remote_code or None}
    cfg = load_run_config(method, optimizer, config, flags, set_)
    _setup_torch()
    outcome = run_pipeline(cfg, overwrite=overwrite, progress=not quiet, log=console.print)
    record = {"method": cfg.method["name"], "optimizer": cfg.optimizer["name"]}
    _markdown_table([
        row_from("(target, before unlearning)", {"method": "—", "optimizer": "—", "metrics": outcome.target_metrics}),
        row_from(outcome.run_dir.name, record | {"metrics": outcome.metrics, "train": outcome.train}),
    ])
    console.print(f"run saved to {outcome.run_dir}/ (model/, metrics.json, log.jsonl, config.yaml)")


@app.command("eval")
def eval_(
    run_dir: Annotated[Path | None, typer.Option("--run", help="Run folder to (re)evaluate.")] = None,
    model: Annotated[str | None, typer.Option(help="Evaluate any model instead of a run.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a run's model (rewrites its metrics.json) or any model (prints metrics)."""
    from unlearn.config import load_run_config, read_yaml
    from unlearn.evaluate import evaluate
    from unlearn.models import load_model
    from unlearn.pipeline import load_task
    from unlearn.runs import read_json, write_json_atomic

    if (run_dir is None) == (model is None):
        raise UserError("give exactly one of --run RUN_DIR or --model MODEL")
    if run_dir is not None:
        if not run_dir.is_dir():
            raise UserError(f"run folder {run_dir} does not exist")
        if not (run_dir / "model" / "config.json").is_file():
            raise UserError(f"run folder {run_dir} has no model/ (was it written by `unlearn run`?)")
        saved = read_yaml(run_dir / "config.yaml")
        benchmark, spec = saved.get("benchmark", {}), str(run_dir / "model")
        eval_cfg = saved.get("eval", {})
    else:
        cfg = load_run_config("npo", "adamw", config, {}, set_)  # only benchmark/eval sections matter
        benchmark, spec, eval_cfg = cfg.benchmark, model, cfg.eval.__dict__
    _setup_torch()
    task = load_task(benchmark)
    loaded = load_model(spec)
    metrics = evaluate(loaded.model, loaded.tokenizer, task, int(eval_cfg.get("batch_size", 64)),
                       int(eval_cfg.get("max_new_tokens", 16)), progress=not quiet)
    if run_dir is not None:
        record = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
        write_json_atomic(run_dir / "metrics.json", record | {"metrics": metrics})
    for key, value in metrics.items():
        console.print(f"{key:40s} {value:.4f}", markup=False, highlight=False)


@app.command()
def report(
    runs_dir: Annotated[Path, typer.Argument(help="Folder holding run folders.")] = Path("runs"),
    csv_path: Annotated[Path | None, typer.Option("--csv", help="CSV output (default RUNS_DIR/report.csv).")] = None,
) -> None:
    """One Markdown row per run (printed, and saved as report.md) plus the same as CSV."""
    from benchmarks.report import collect, markdown, to_csv

    rows = collect(runs_dir)
    table = markdown(rows)
    print(table)
    (runs_dir / "report.md").write_text(table + "\n")
    (csv_path or runs_dir / "report.csv").write_text(to_csv(rows))
    console.print(f"wrote {runs_dir / 'report.md'} and {csv_path or runs_dir / 'report.csv'}")


@app.command()
def prepare(
    model: Annotated[str | None, typer.Option(help="Base model (default from configs/run.yaml).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Build (or find cached) the target model that knows the benchmark's forget and retain facts."""
    from benchmarks.prepare import prepare_record, target_model
    from unlearn.config import load_run_config
    from unlearn.pipeline import load_task

    cfg = load_run_config("npo", "adamw", config, {"model": model}, set_)
    _setup_torch()
    task = load_task(cfg.benchmark)
    folder = target_model(cfg.model, task, cfg.benchmark.get("prepare", {}), cfg.trust_remote_code,
                          progress=not quiet)
    record = prepare_record(folder)
    for split in ("forget", "retain", "holdout"):
        console.print(f"{split:8s} MCQ accuracy {record['metrics'][f'{split}/mcq_acc']:.3f}")
    console.print(f"target model: {folder / 'model'}  (prepared in {record['seconds']} s)")


@app.command()
def models() -> None:
    """List the embedded model aliases and where converted models are cached."""
    from unlearn.models import EMBEDDED, cache_dir

    for alias, (_, filename, dist) in EMBEDDED.items():
        converted = cache_dir() / "models" / alias
        state = "converted" if (converted / "model.safetensors").is_file() else "not yet converted"
        console.print(f"{alias:16s} {filename} from PyPI package {dist}; {state} ({converted})")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as err:
        _fail(str(err), 2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - last line of defence: one line unless debugging
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(2)
        if os.environ.get("UNLEARN_DEBUG"):
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _fail(f"internal error ({type(err).__name__}: {first}); set UNLEARN_DEBUG=1 for the traceback", 1)


if __name__ == "__main__":
    main()
