"""`unlearn run | eval | attack | report | study | prepare | example-data`, and the listings `models | methods |
optimizers | benchmarks | attacks`.

User mistakes (UserError) end in one line on stderr and exit code 2; an interrupt (Ctrl-C, SIGTERM) ends in
`error: interrupted` / `error: terminated` and exit code 130 / 143. Nothing half-written stays on disk because
every output is staged and renamed into place (unlearn/storage/runs.py).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from unlearn.core.errors import UserError, shown
from unlearn.core.interrupts import Interrupted, exit_interrupted, install_handlers, raise_pending

if TYPE_CHECKING:  # imported for the annotation only: the CLI keeps its start-up light
    from unlearn.tasks.task import Task

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LLM unlearning robustness toolkit: unlearn, attack, evaluate, report.")
# Long paths and table rows must not be wrapped; names, paths and notes come from input, so nothing printed is
# read as rich markup.
console = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)


MAX_ERROR_CHARACTERS = 1000  # values inside are already cut (unlearn.core.errors.shown); this bounds the rest


def _fail(message: str, code: int) -> None:
    # Plain print, not rich: errors must stay on one line whatever the terminal width.
    line = " ".join(message.split()) or "error"
    if len(line) > MAX_ERROR_CHARACTERS:
        line = line[:MAX_ERROR_CHARACTERS] + f"... ({len(line) - MAX_ERROR_CHARACTERS} more characters)"
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Allow model folders and hub repos to run their own code (never read from configs).")]

def _include(paths: list[Path] | None) -> list[Path] | None:
    """Register the user's own components before anything else is parsed or looked up."""
    from unlearn.core.registry import include

    for path in paths or []:
        include(path)
    return paths


IncludeOpt = Annotated[list[Path] | None, typer.Option(
    "--include", is_eager=True, callback=_include, metavar="PATH",
    help="Your own components: a Python file, or a folder of them, imported first so that its registered "
         "methods, optimizers, benchmarks and attacks can be named. Code you choose to run; a config never names "
         "one. Repeatable.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file merged over configs/run.yaml.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config key: train.max_steps=100.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOpt = Annotated[str | None, typer.Option(
    help="auto (a GPU if there is one), cpu, cuda (this process's GPU under torchrun/accelerate) or cuda:N "
         "(train.device).")]
DtypeOpt = Annotated[str | None, typer.Option(
    help="Compute precision: auto (bf16 on a GPU that has it, else fp32), bf16, fp16 or fp32 (train.dtype); "
         "--precision says what the updates are added to.")]
PrecisionOpt = Annotated[str | None, typer.Option(
    help="What updates are added to in bf16/fp16: auto (master for gradient grades, lean for zeroth-order), "
         "master (fp32 weights, compute under autocast), lean (bf16 weights, stochastically rounded updates) or "
         "pure (rounded to nearest) (train.precision).")]
LogSamplesOpt = Annotated[bool, typer.Option(
    "--log-samples", help="Also write one JSON line per scored item (prompt, gold, scores or generation, correct) "
                          "to samples.jsonl in the run folder, or to --samples-path.")]
SamplesPathOpt = Annotated[Path | None, typer.Option(help="Where --log-samples writes (a .jsonl file).")]
BenchmarkOpt = Annotated[str | None, typer.Option(
    help="Benchmark (default embedded; see `unlearn benchmarks`, options in configs/benchmark/).")]
DataOpt = Annotated[str | None, typer.Option(
    help="Benchmark data: a file (wmdp, openqa: {question, choices, answer} records), a MUSE-layout folder, "
         "or a hub name (wmdp_bio, news, ...).")]
EngineOpt = Annotated[str | None, typer.Option(
    help="MCQ scoring on wmdp/openqa: lm-eval (lm-eval-harness) or native (in-loop scorer).")]
OpenQAOpt = Annotated[bool, typer.Option("--openqa", help="Also ask the MCQs open-ended and judge the answers.")]
JudgeOpt = Annotated[str | None, typer.Option(
    help="NLI model (hub id or folder) judging open-ended answers (default: normalized match).")]


def _path_or_name(value: str | None) -> str | None:
    """Local paths are stored absolute (a run's config.yaml must still work from another folder); anything
    else (hub names) as given."""
    return str(Path(value).resolve()) if value is not None and Path(value).exists() else value


def _benchmark_flags(data: str | None, engine: str | None, openqa: bool, judge: str | None) -> dict[str, object]:
    return {"benchmark.data": _path_or_name(data), "eval.engine": engine, "eval.openqa": openqa or None,
            "eval.judge": _path_or_name(judge)}


def _preflight() -> None:
    """Checks every model-loading command makes before loading anything: the cache folder takes files."""
    from unlearn.compute.models import cache_dir
    from unlearn.core.files import writable_dir

    writable_dir(cache_dir(), "cache folder (UNLEARN_CACHE)")


def threads_per_process(env: dict[str, str], cores: int) -> int:
    """CPU threads for this process: UNLEARN_THREADS if set, else OMP_NUM_THREADS (torchrun sets it), else this
    process's share of the cores it may run on, when a launcher starts several per machine (LOCAL_WORLD_SIZE).
    Each process taking every core makes a loaded machine several times slower."""
    for key in ("UNLEARN_THREADS", "OMP_NUM_THREADS"):
        value = env.get(key, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{key} must be a positive integer (CPU threads), got {shown(value)}")
            return int(value)
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()
    share = int(local) if local.isdigit() and int(local) >= 1 else 1
    return max(1, cores // share)


def _setup_torch() -> None:
    _preflight()
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads_per_process(dict(os.environ), cores))
    from unlearn.compute.models import quiet_transformers

    quiet_transformers()


def _markdown_table(table) -> None:
    from unlearn.recipes.report import markdown

    print(markdown(table))  # plain print: rich would wrap table rows at the terminal width


@app.command()
def run(
    ctx: typer.Context,
    method: Annotated[str | None, typer.Option(help="Method (see `unlearn methods`).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="Optimizer (see `unlearn optimizers`, with its grade).")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id, local HF folder, or smollm2-135m.")] = None,
    benchmark: BenchmarkOpt = None,
    data: DataOpt = None,
    forget_corpus: Annotated[str | None, typer.Option(
        help="wmdp/openqa: file of {text} records to unlearn (benchmark.forget_corpus).")] = None,
    retain_corpus: Annotated[str | None, typer.Option(
        help="wmdp/openqa: retain text, wikitext (hub) or a file of {text} records.")] = None,
    engine: EngineOpt = None,
    openqa: OpenQAOpt = False,
    judge: JudgeOpt = None,
    steps: Annotated[int | None, typer.Option(help="Unlearning steps (train.max_steps).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (optimizer.lr).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (train.batch_size).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (train.seed).")] = None,
    lora_rank: Annotated[int | None, typer.Option(
        help="Unlearn through LoRA adapters of this rank (train.lora_rank; 0 = full weights).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    precision: PrecisionOpt = None,
    save_dtype: Annotated[str | None, typer.Option(
        help="Precision of the saved model: bf16, fp16 or fp32 (train.save_dtype; default: as trained).")] = None,
    grad_accum: Annotated[int | None, typer.Option(
        help="Micro-batches per step on each process (train.grad_accum): the batch is cut into grad_accum x "
             "processes shards.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute layer activations in backward: less memory, more time "
                                         "(train.gradient_checkpointing).")] = False,
    max_length: Annotated[int | None, typer.Option(
        help="Tokens per training text (train.max_length; default: the benchmark's).")] = None,
    save_every: Annotated[int | None, typer.Option(
        help="Checkpoint every N steps so an interrupted run can be resumed (train.save_every).")] = None,
    parallel: Annotated[str | None, typer.Option(
        help="Under torchrun/accelerate: data (every process holds the model) or fsdp (parameters sharded "
             "across processes; adamw, sgd) (train.parallel).")] = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue the interrupted run NAME (under --output-dir) from its last checkpoint, with its saved "
             "settings.")] = None,
    name: Annotated[str | None, typer.Option(help="Run folder name (default METHOD-OPTIMIZER).")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Where run folders go (default runs).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder of the same name.")] = False,
    trust_remote_code: TrustOpt = False,
    log_samples: Annotated[bool, typer.Option(
        "--log-samples", help="Also write the final evaluation's per-item samples to samples.jsonl in the run "
                              "folder.")] = False,
    report_to: Annotated[str | None, typer.Option(
        help="Live curves besides log.jsonl: none, tensorboard (event files in the run folder's tensorboard/) or "
             "wandb (Weights & Biases, offline without WANDB_API_KEY) (report_to).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    include: IncludeOpt = None,
) -> None:
    """Unlearn the forget set from the target model, save it, evaluate it, print the table. The same command runs
    under `torchrun` / `accelerate launch` on several GPUs or CPU processes (README: one GPU to eight)."""
    from unlearn.recipes.pipeline import resumed_config
    from unlearn.recipes.pipeline import run as run_pipeline
    from unlearn.recipes.report import run_summary
    from unlearn.training.config import load_run_config

    flags = {"model": _path_or_name(model), "train.max_steps": steps, "optimizer.lr": lr,
             "train.batch_size": batch_size, "train.seed": seed, "train.lora_rank": lora_rank, "name": name,
             "train.device": device, "train.dtype": dtype, "train.save_dtype": save_dtype,
             "train.precision": precision, "train.grad_accum": grad_accum,
             "train.gradient_checkpointing": gradient_checkpointing or None,
             "train.max_length": max_length, "train.save_every": save_every, "train.parallel": parallel,
             "report_to": report_to,
             "benchmark.forget_corpus": _path_or_name(forget_corpus),
             "benchmark.retain_corpus": _path_or_name(retain_corpus)} | _benchmark_flags(data, engine, openqa, judge)
    if resume is not None:
        given = _flags_given(ctx, keep=RESUME_KEEPS)
        if given:
            raise UserError(f"--resume continues a run with its saved settings; {given[0]} cannot change them")
        cfg = resumed_config(resume, output_dir, report_to)
    else:
        cfg = load_run_config(method, optimizer, config, flags | {"output_dir": output_dir}, set_,
                              benchmark=benchmark)
    _setup_torch()
    outcome = run_pipeline(cfg, overwrite=overwrite, progress=not quiet, log=console.print,
                           trust_remote_code=trust_remote_code, log_samples=log_samples, resume=resume is not None)
    if outcome is None:
        return  # another process of a multi-process run: rank 0 reports
    _markdown_table(run_summary(outcome.run_dir.name, outcome.record))
    logs = "log-<n>-<request>.jsonl" if outcome.record.stages else "log.jsonl"
    logs += ", samples.jsonl" if log_samples else ""
    logs += f", {cfg.report_to}/" if cfg.report_to != "none" else ""  # the tracker's folder (unlearn.storage.tracking)
    console.print(f"run saved to {outcome.run_dir}/ (model/, metrics.json, config.yaml, {logs})")


# What --resume may be given with: where to find the run and how to show it, never a setting it saved.
RESUME_KEEPS = ("resume", "output_dir", "trust_remote_code", "log_samples", "quiet", "include", "report_to")


def _flags_given(ctx: typer.Context, keep: tuple[str, ...]) -> list[str]:
    """The options typed on the command line (as typed: --steps), other than those in `keep`."""
    given = []
    for param in ctx.command.params:
        # typer may carry its own copy of click: the source is compared by name, not by class
        source = ctx.get_parameter_source(param.name) if param.name else None
        if param.name in keep or getattr(source, "name", None) != "COMMANDLINE":
            continue
        given.append(next((o for o in param.opts if o.startswith("--")), param.opts[0]))
    return given


def _print_metrics(metrics: dict[str, float], task: Task | None = None) -> None:
    """One metric per line with its unit (benchmarks report on different scales: MUSE ×100, accuracies 0-1); a
    metric's interval (`<key>_low`, `<key>_high`) on its own line."""
    for key, value in metrics.items():
        if key.endswith(("_low", "_high")) and key.rsplit("_", 1)[0] in metrics:
            continue
        unit = task.unit(key) if task is not None else ""
        low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
        spread = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        console.print(f"{key:40s} {value:10.4f}{spread}  {unit}".rstrip())


def _samples_path(log_samples: bool, samples_path: Path | None, run_dir: Path | None) -> Path | None:
    """Where per-item samples go; checked before any model loads."""
    if samples_path is not None and not log_samples:
        raise UserError("--samples-path goes with --log-samples")
    if not log_samples:
        return None
    if samples_path is None:
        if run_dir is None:
            raise UserError("--log-samples with --model needs --samples-path FILE.jsonl (there is no run folder)")
        return run_dir / "samples.jsonl"
    if samples_path.is_dir():
        raise UserError(f"--samples-path {samples_path} is a folder; give a file name")
    if not samples_path.parent.is_dir():
        raise UserError(f"--samples-path: folder {samples_path.parent} does not exist")
    return samples_path


@app.command("eval")
def eval_(
    run_dir: Annotated[Path | None, typer.Option("--run", help="Run folder to (re)evaluate.")] = None,
    model: Annotated[str | None, typer.Option(help="Evaluate any model instead of a run.")] = None,
    benchmark: BenchmarkOpt = None,
    data: DataOpt = None,
    engine: EngineOpt = None,
    openqa: OpenQAOpt = False,
    judge: JudgeOpt = None,
    trust_remote_code: TrustOpt = False,
    log_samples: LogSamplesOpt = False,
    samples_path: SamplesPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    include: IncludeOpt = None,
) -> None:
    """Evaluate a run's model (rewrites its metrics.json and items.json) or any model (prints metrics)."""
    from unlearn.core.files import write_jsonl_atomic
    from unlearn.recipes.evaluate import evaluate
    from unlearn.recipes.subject import held, subject_for

    samples_file = _samples_path(log_samples, samples_path, run_dir)
    with held(run_dir):  # read, evaluated and rewritten as one run: no overwrite can slip in between
        subject = subject_for(run_dir, model, config, set_, benchmark, _benchmark_flags(data, engine, openqa, judge),
                           trust_remote_code, device, dtype)
        for note in subject.task.notes:
            console.print(f"note: {note}")
        _setup_torch()
        result = evaluate(subject, progress=not quiet)
    _print_metrics(result.metrics, subject.task)
    if samples_file is not None:
        write_jsonl_atomic(samples_file, result.samples)
        console.print(f"wrote {samples_file} ({len(result.samples)} samples)")
    console.print(f"{subject.task.name}: {len(result.metrics)} metrics in {result.seconds:.1f} s "
                  f"(model load included)")


@app.command()
def attack(
    run_dir: Annotated[Path | None, typer.Option("--run", help="Run folder to attack.")] = None,
    model: Annotated[str | None, typer.Option(help="Attack any model instead of a run (results printed only).")] = None,
    attack_name: Annotated[str | None, typer.Option(
        "--attack", help="Attack by name (see `unlearn attacks`); settings from configs/attack/NAME.yaml, "
                         "--set attack.KEY=VALUE and the flags below.")] = None,
    quantize: Annotated[str | None, typer.Option(
        help="Short form of --attack quantize: 4bit (bitsandbytes NF4/FP4), 8bit (LLM.int8), or "
             "rtn2/rtn3/rtn4/rtn8 (round-to-nearest), quanto2/quanto4/quanto8 (optimum-quanto).")] = None,
    quant_type: Annotated[str | None, typer.Option(help="4-bit data type: nf4 or fp4 (attack.quant_type).")] = None,
    group_size: Annotated[int | None, typer.Option(
        help="RTN group size (attack.group_size; default per output channel).")] = None,
    relearn: Annotated[bool, typer.Option("--relearn", help="Short form of --attack relearn: fine-tune on part of "
                                                            "the forget text.")] = False,
    grid: Annotated[Path | None, typer.Option(
        help="A tampering grid file (configs/grids/tamper.yaml): every member attacked in turn, then the worst case "
             "(attacks/worst-NAME/).")] = None,
    samples: Annotated[int | None, typer.Option(
        help="Forget items to relearn on (attack.samples; default half).")] = None,
    steps: Annotated[int | None, typer.Option(help="Relearning steps (attack.steps).")] = None,
    lr: Annotated[float | None, typer.Option(help="Relearning learning rate, AdamW (attack.lr).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Relearning batch size (attack.batch_size).")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Relearn through a LoRA adapter.")] = False,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank (attack.lora_rank).")] = None,
    out_of_domain: Annotated[bool, typer.Option("--out-of-domain", help="Relearn on retain text instead.")] = False,
    checkpoints: Annotated[str | None, typer.Option(
        help="Steps at which to measure recovery, comma-separated (attack.checkpoints).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the relearning split and data order.")] = None,
    benchmark: BenchmarkOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    include: IncludeOpt = None,
) -> None:
    """Attack an unlearned model (quantization, relearning, ...) and score it like `unlearn eval`. Every setting's
    default: `unlearn attacks`."""
    from unlearn.evaluation.collapse import COLLAPSED_NOTE
    from unlearn.recipes.attack import attack_settings, run_attack
    from unlearn.recipes.subject import held, subject_for

    chosen = [n for n, given in (("--attack", attack_name), ("--quantize", quantize), ("--relearn", relearn),
                                 ("--grid", grid)) if given]
    if len(chosen) != 1:
        raise UserError("choose one attack: --quantize BITS, --relearn, --attack NAME or --grid FILE"
                        + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if grid is not None:
        _attack_grid(grid, run_dir, model, config, set_, benchmark, data, trust_remote_code, device, dtype, quiet)
        return
    from unlearn.attacks.quantize import Quantize
    from unlearn.attacks.relearn import Relearn

    # The flags are the attacks' settings under their own names; the attacks say what their short forms stand for.
    flags: dict[str, object] = {"quant_type": quant_type, "group_size": group_size, "samples": samples,
                                "steps": steps, "lr": lr, "batch_size": batch_size, "lora": lora or None,
                                "lora_rank": lora_rank, "seed": seed}
    flags |= Relearn.short_form(out_of_domain, checkpoints)
    name = attack_name or ("relearn" if relearn else "quantize")
    if quantize is not None:
        flags |= Quantize.short_form(quantize)
    attack_sets = [a for a in set_ or [] if a.strip().startswith("attack.")]
    other_sets = [a for a in set_ or [] if a not in attack_sets]
    # Settings first, so a bad value fails before the model or the benchmark is loaded.
    name, component, settings = attack_settings(name, flags, attack_sets)
    if run_dir is not None and other_sets:
        raise UserError("a run is attacked on its own benchmark: --set goes with --model (or use attack.KEY=VALUE)")
    with held(run_dir):  # the run attacked is the run the result is filed under
        subject = subject_for(run_dir, model, config, other_sets, benchmark, {"benchmark.data": _path_or_name(data)},
                           trust_remote_code, device, dtype)
        _setup_torch()
        if subject.collapse:
            console.print(f"warning: {run_dir} collapsed ({'; '.join(subject.collapse)}); {COLLAPSED_NOTE}")
        record, folder = run_attack(subject, name, component, settings, progress=not quiet)
    if record.curve:
        keys = [k for k in record.curve[0] if k != "step"]
        for point in record.curve:
            console.print(f"step {point['step']:4d}  " + "  ".join(
                f"{_title(record.curve_metrics, k)} {point[k]:.3f}" for k in keys))
    _print_metrics(record.metrics, subject.task)
    for recovery in record.recoveries:
        _print_recovery(recovery)
    if folder is not None:
        console.print(f"wrote {folder / 'metrics.json'}")


def _print_recovery(recovery: Any, interval: str = "95 % bootstrap over {n} items") -> None:
    where = recovery.metric + (f", {recovery.measured_on}" if recovery.measured_on != recovery.metric else "")
    if recovery.ratio is None:
        console.print(f"recovery ratio ({where}): {recovery.note}")
        return
    spread = (f" [{recovery.low:.3f}, {recovery.high:.3f}] ({interval.format(n=recovery.n)})"
              if recovery.low is not None and recovery.high is not None else "")
    caveat = f"; {recovery.note.removeprefix('ok; ')}" if recovery.note not in ("", "ok") else ""
    console.print(f"recovery ratio ({where}): {recovery.ratio:.3f}{spread}{caveat}")


def _attack_grid(path: Path, run_dir: Path | None, model: str | None, config: Path | None, set_: list[str] | None,
                 benchmark: str | None, data: str | None, trust_remote_code: bool, device: str | None,
                 dtype: str | None, quiet: bool) -> None:
    """`unlearn attack --grid FILE`: every member, then the worst case over them."""
    from unlearn.recipes.subject import held, subject_for
    from unlearn.recipes.worst_case import read_grid, run_grid

    grid = read_grid(path)  # every member's settings checked before any model loads
    if set_:
        raise UserError("--grid takes its settings from the grid file; --set does not apply to it")
    with held(run_dir):
        subject = subject_for(run_dir, model, config, [], benchmark, {"benchmark.data": _path_or_name(data)},
                              trust_remote_code, device, dtype)
        _setup_torch()
        worst, members, folder = run_grid(subject, grid, progress=not quiet, log=console.print)
    for record in members:
        if record.recovery is not None:
            console.print(f"{record.attack}: ", end="")
            _print_recovery(record.recovery)
    console.print(f"worst case over {len(members)} attacks:")
    if worst.recovery is not None:
        _print_recovery(worst.recovery, f"95 % for the maximum: each member's item interval at "
                                        f"{worst.details.get('each_level', 0):.4f}, Bonferroni")
    if folder is not None:
        console.print(f"wrote {folder / 'metrics.json'}")


def _title(metrics, key: str) -> str:
    from unlearn.storage.metrics import declaration

    spec = declaration(metrics, key)
    return spec.title if spec is not None else key


@app.command()
def report(
    runs_dir: Annotated[Path, typer.Argument(help="Folder holding run folders.")] = Path("runs"),
    csv_path: Annotated[Path | None, typer.Option("--csv", help="CSV output (default RUNS_DIR/report.csv).")] = None,
    include: IncludeOpt = None,
) -> None:
    """One Markdown row per run (printed, and saved as report.md) plus the same as CSV."""
    from unlearn.recipes.report import write_report

    notes: list[str] = []
    table, written = write_report(runs_dir, csv_path, notes)
    for note in notes:
        console.print(f"note: {note}")
    print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))


@app.command()
def study(
    config: Annotated[Path, typer.Argument(help="Study file (configs/study/NAME.yaml).")],
    trust_remote_code: TrustOpt = False,
    quiet: QuietOpt = False,
    workers: Annotated[int, typer.Option(min=1, help=(
        "Cells run at once, each in its own process with its share of the CPU threads (2 on 2 cores: about 1.1x "
        "the throughput, python -m unlearn.perf.study_parallelism). Runs then print lines, not progress bars."))] = 1,
    include: IncludeOpt = None,
) -> None:
    """Run a study: methods × optimizers × seeds, each run attacked by every attack, into one folder with
    results.csv, summary.md (means with 95 % intervals, paired comparisons) and plots. Run it again after an
    interruption: complete runs and attacks are skipped."""
    from unlearn.recipes.study.plan import load_study
    from unlearn.recipes.study.recipe import run_study

    plan = load_study(config)  # every cell's settings checked before any model loads
    trials = f", after {len(plan.trials)} calibration trials" if plan.trials else ""
    console.print(f"study {plan.folder}: {len(plan.cells)} runs × {len(plan.attacks)} attacks{trials}")
    _setup_torch()
    outcome = run_study(plan, progress=not quiet, log=console.print, trust_remote_code=trust_remote_code,
                        workers=workers)
    console.print("wrote " + ", ".join(str(p) for p in outcome.written))
    if outcome.failures:
        raise UserError(f"{len(outcome.failures)} part(s) of the study failed (listed in summary.md); "
                        f"the rest is summarized")


@app.command()
def prepare(
    model: Annotated[str | None, typer.Option(help="Base model (default from configs/run.yaml).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    precision: PrecisionOpt = None,
    trust_remote_code: TrustOpt = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    include: IncludeOpt = None,
) -> None:
    """Build (or find cached) the target model that knows the benchmark's forget and retain facts."""
    from unlearn.recipes.prepare import prepare_target

    _setup_torch()
    prepared = prepare_target(_path_or_name(model), {"train.device": device, "train.dtype": dtype,
                                                     "train.precision": precision}, config, set_,
                              trust_remote_code, progress=not quiet)
    for key, value in prepared.summary.items():
        console.print(f"{key:18s} {value:.3f}")
    console.print(f"target model: {prepared.folder / 'model'}  (prepared in {prepared.record['seconds']} s)")


@app.command("example-data")
def example_data(
    folder: Annotated[Path, typer.Argument(help="Where to write wmdp/, muse/ and tofu/.")] = Path("example-data"),
    overwrite: Annotated[bool, typer.Option(help="Replace the folder if it exists.")] = False,
    include: IncludeOpt = None,
) -> None:
    """Write small WMDP-format, MUSE-layout and TOFU-layout files about the embedded world (offline use, tests)."""
    from unlearn.benchmarks.example_data import write_example_data

    written = write_example_data(folder, overwrite=overwrite)
    wmdp, muse, tofu = written["wmdp"], written["muse"], written["tofu"]
    console.print(f"wrote {wmdp}/ (questions.jsonl, mmlu.jsonl, forget_corpus.jsonl, retain_corpus.jsonl), "
                  f"{muse}/ (MUSE layout) and {tofu}/ (TOFU layout)")
    console.print("The embedded target model knows these facts: `unlearn prepare` prints its folder. Try:\n"
                  f"  unlearn eval --benchmark wmdp --data {wmdp}/questions.jsonl --set benchmark.utility="
                  f"{wmdp}/mmlu.jsonl --model TARGET\n"
                  f"  unlearn eval --benchmark muse --data {muse} --model TARGET\n"
                  f"  unlearn eval --benchmark tofu --data {tofu} --model TARGET\n"
                  f"  unlearn run --benchmark wmdp --data {wmdp}/questions.jsonl --forget-corpus "
                  f"{wmdp}/forget_corpus.jsonl --retain-corpus {wmdp}/retain_corpus.jsonl --model TARGET")


@app.command()
def models(include: IncludeOpt = None) -> None:
    """List the embedded model aliases and where converted models are cached."""
    from unlearn.compute.models import embedded_listing

    for line in embedded_listing():
        console.print(line)


def _defaults(kind: str, name: str, settings: type | None = None) -> str:
    """The component's defaults: its declared settings' own (when given), then configs/<kind>/<name>.yaml's."""
    import dataclasses

    from unlearn.training.config import component_defaults

    values: dict[str, Any] = {}
    if settings is not None and dataclasses.is_dataclass(settings):
        values = {f.name: f.default for f in dataclasses.fields(settings) if f.default is not dataclasses.MISSING}
    values.update(component_defaults(kind, name))
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


@app.command()
def optimizers(include: IncludeOpt = None) -> None:
    """List every optimizer with its grade and default options (configs/optimizer/<name>.yaml)."""
    from unlearn.optim.protocol import OPTIMIZERS

    for name in sorted(OPTIMIZERS, key=lambda n: (OPTIMIZERS[n].grade, n)):  # type: ignore[attr-defined]
        console.print(f"{name:11s} {OPTIMIZERS[name].grade:13s} {_defaults('optimizer', name)}")  # type: ignore[attr-defined]


@app.command()
def methods(include: IncludeOpt = None) -> None:
    """List every unlearning method with its default options (configs/method/<name>.yaml)."""
    from unlearn.training.methods import METHODS

    labels = {name: name + (f" ({', '.join(METHODS.aliases(name))})" if METHODS.aliases(name) else "")
              for name in sorted(METHODS)}
    width = max(map(len, labels.values()), default=0)
    for name, label in labels.items():
        console.print(f"{label:{width}s}  {_first_line(METHODS[name].__doc__)}")
        defaults = _defaults("method", name, METHODS[name].Settings)
        if defaults:
            console.print(f"{'':{width}s}  {defaults}")


@app.command()
def benchmarks(include: IncludeOpt = None) -> None:
    """List every benchmark (options in configs/benchmark/<name>.yaml)."""
    import sys

    from unlearn.tasks.task import BENCHMARKS

    for name in sorted(BENCHMARKS):
        benchmark = BENCHMARKS[name]
        about = _first_line(benchmark.__doc__) or _first_line(sys.modules[benchmark.__module__].__doc__)
        console.print(f"{name:10s} {about}")


@app.command()
def attacks(include: IncludeOpt = None) -> None:
    """List every attack with its default settings (configs/attack/<name>.yaml)."""
    from unlearn.attacks.base import ATTACKS

    for name in sorted(ATTACKS):
        console.print(f"{name:10s} {ATTACKS[name].summary}")
        console.print(f"{'':10s} {_defaults('attack', name)}")


def _usage_error(err: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for a command-line usage error. typer may carry its own copy of click, so
    its exceptions are recognised by what they provide, not by class."""
    show, message = getattr(err, "show", None), getattr(err, "format_message", None)
    code = getattr(err, "exit_code", None)
    if callable(show) and callable(message) and isinstance(code, int):
        text = " ".join(str(message()).split()) or type(err).__name__
        command = getattr(getattr(err, "ctx", None), "command_path", None)
        return (f"{text} (see `{command} --help`)" if command else text), code or 2
    return None


def main() -> None:
    install_handlers()  # already done by unlearn.entry for the command; here for in-process callers
    try:
        code = app(standalone_mode=False)
        raise_pending()  # a Ctrl-C during the command's imports that was not yet delivered
        # Non-standalone typer *returns* the exit code of an explicit typer.Exit (and 130 for a
        # KeyboardInterrupt raised outside our handler): it must still reach the shell.
        if isinstance(code, int) and code != 0:
            if code == 130:
                _fail("interrupted", 130)
            sys.exit(code)
    except Interrupted as err:
        exit_interrupted(err)
    except UserError as err:
        _fail(str(err), 2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        _fail("interrupted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - last line of defence: one line unless debugging
        usage = _usage_error(err)
        if usage is not None:
            _fail(*usage)
        if os.environ.get("UNLEARN_DEBUG"):
            traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _fail(f"internal error ({type(err).__name__}: {first}); set UNLEARN_DEBUG=1 for the traceback", 1)


if __name__ == "__main__":
    main()
