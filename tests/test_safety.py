"""Shared configs and run folders are untrusted: each hole found in them has a test that replays the attack.

- template injection through `benchmark.subject` (lm-eval renders descriptions with Jinja);
- `trust_remote_code` smuggled in through a config or a saved run config;
- run names that escape the output folder, and `--overwrite` deleting a folder that is not a run;
- two writers on one run folder; staging folders left by killed runs;
- Ctrl-C / SIGTERM reported as success.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_BENCH, call_main, cli, sigint_as_in_a_terminal

MARKER = "PWNED"


def _payload(folder: Path) -> str:
    """The exploit from the issue: with lm-eval's own Jinja environment it runs a shell command."""
    return "{{ lipsum.__globals__['os'].system('touch " + str(folder / MARKER) + "') }}"


def _questions(path: Path) -> Path:
    rows = [{"question": f"Which number is {i}?", "choices": [str(i), str(i + 1), str(i + 2), str(i + 3)],
             "answer": 0} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_payload_is_real_and_both_walls_stop_it(tmp_path):
    """Control: lm-eval's stock template rendering executes the payload. Then: the escaped description renders
    to the payload's text, and inside the sandbox even the raw payload fails instead of running."""
    import lm_eval.utils
    from jinja2.exceptions import SecurityError

    from unlearn.benchmarks.wmdp import jinja_literal, sandboxed_lm_eval_templates

    payload = _payload(tmp_path)
    lm_eval.utils.apply_template(payload, {})
    assert (tmp_path / MARKER).exists(), "the control must show the payload runs unprotected"
    (tmp_path / MARKER).unlink()
    assert lm_eval.utils.apply_template(jinja_literal(payload), {}) == payload
    with sandboxed_lm_eval_templates(), pytest.raises(SecurityError):
        lm_eval.utils.apply_template(payload, {})
    assert lm_eval.utils.apply_template("{{ question.strip() }}", {"question": " q "}) == "q"  # restored
    assert not (tmp_path / MARKER).exists()


def test_payload_in_a_config_and_in_a_received_run_runs_nothing(tmp_path, tiny_model_dir):
    data = _questions(tmp_path / "questions.jsonl")
    config = tmp_path / "evil.yaml"
    config.write_text(yaml.safe_dump({"benchmark": {"name": "wmdp", "data": str(data), "subject": _payload(tmp_path)},
                                      "eval": {"engine": "lm-eval", "batch_size": 4}}))
    code, out, err = call_main(["eval", "--model", str(tiny_model_dir), "--config", str(config), "-q"], tmp_path)
    assert code == 0, err
    assert "wmdp/acc" in out  # it was scored by lm-eval, with the payload as plain description text
    assert not (tmp_path / MARKER).exists()

    received = tmp_path / "received" / "evilrun"
    shutil.copytree(tiny_model_dir, received / "model")
    (received / "config.yaml").write_text(config.read_text())
    code, out, err = call_main(["eval", "--run", str(received), "-q"], tmp_path)
    assert code == 0, err
    assert "wmdp/acc" in out
    assert not (tmp_path / MARKER).exists()


def test_remote_code_never_comes_from_a_config(tmp_path, tiny_model_dir):
    """A model folder whose config maps the model to its own script: loading it without the flag must not run
    the script; a config cannot turn the flag on; a run made with the flag does not pass it on."""
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, evil)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil_code.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).touch()\n")

    code, _, err = call_main(["run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir),
                              "--steps", "1", "--batch-size", "2", "--name", "made-with-flag", "-q",
                              "--trust-remote-code", *TINY_BENCH], tmp_path)
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "runs" / "made-with-flag" / "config.yaml").read_text())
    assert "trust_remote_code" not in saved  # whoever reuses this config does not inherit the flag

    code, _, err = call_main(["eval", "--model", str(evil), "-q", *TINY_BENCH], tmp_path)
    assert code == 0, err
    assert not (tmp_path / MARKER).exists(), "the model folder's own code ran without --trust-remote-code"

    (tmp_path / "smuggle.yaml").write_text("trust_remote_code: true\n")
    code, _, err = call_main(["eval", "--model", str(evil), "--config", str(tmp_path / "smuggle.yaml"), "-q"],
                             tmp_path)
    assert code == 2 and "is refused" in err
    assert not (tmp_path / MARKER).exists()


def test_overwrite_only_replaces_toolkit_folders(tmp_path):
    precious = tmp_path / "runs" / "thesis"
    precious.mkdir(parents=True)
    (precious / "chapter1.tex").write_text("months of work")
    code, _, err = call_main(["run", "--method", "npo", "--optimizer", "adamw", "--name", "thesis", "--overwrite"],
                             tmp_path)
    assert code == 2 and "was not written by this toolkit" in err
    assert (precious / "chapter1.tex").read_text() == "months of work"

    link = tmp_path / "runs" / "linked"
    link.symlink_to(precious, target_is_directory=True)
    code, _, err = call_main(["run", "--method", "npo", "--optimizer", "adamw", "--name", "linked", "--overwrite"],
                             tmp_path)
    assert code == 2 and "was not written by this toolkit" in err
    assert (precious / "chapter1.tex").exists()

    code, _, err = call_main(["example-data", str(precious), "--overwrite"], tmp_path)
    assert code == 2 and "was not written by this toolkit" in err
    assert sorted(p.name for p in precious.iterdir()) == ["chapter1.tex"]

    code, _, err = call_main(["example-data", str(tmp_path / "ex")], tmp_path)
    assert code == 0, err
    code, _, err = call_main(["example-data", str(tmp_path / "ex"), "--overwrite"], tmp_path)
    assert code == 0, err  # its own folder: replaced


def test_a_second_writer_on_the_same_run_is_refused(tmp_path):
    from unlearn.storage.runs import open_run_dir

    runs = tmp_path / "runs"
    with open_run_dir(runs, "same") as (final, notes):
        assert final == runs / "same" and notes == []
        code, _, err = call_main(["run", "--method", "npo", "--optimizer", "adamw", "--name", "same", "--overwrite"],
                                 tmp_path)
        assert code == 2 and "is being written by another process" in err
        with open_run_dir(runs, "same") as (other, notes):  # without --overwrite: the next free name, said
            assert other == runs / "same-2" and "writing" in notes[0] and "same-2" in notes[0]
    assert not runs.exists()  # locks go with their writers, and so does the folder they created


def _age(path: Path) -> None:
    os.utime(path, (time.time() - 3600, time.time() - 3600))


def test_stale_staging_of_dead_writers_is_removed_and_live_ones_kept(tmp_path):
    from unlearn.storage.locks import FileLock
    from unlearn.storage.runs import MARKER as RUN_MARKER
    from unlearn.storage.runs import clean_stale

    runs = tmp_path / "runs"
    dead = runs / ".staging-dead-0000aaaa"
    (dead / "model").mkdir(parents=True)
    (dead / RUN_MARKER).write_text("{}")
    (dead / "model" / "model.safetensors").write_bytes(b"\0" * 2**20)
    live = runs / ".staging-live-0000bbbb"
    live.mkdir()
    holder = FileLock(live / RUN_MARKER)
    assert holder.acquire()
    young = runs / ".staging-young-0000cccc"  # no marker yet: being created right now
    young.mkdir()
    old = runs / ".staging-old-0000dddd"  # no marker and old: nothing says it is ours, so it stays (with a note)
    old.mkdir()
    _age(old)
    # An old folder moved aside for a replacement that never arrived (kill -9 between the two renames) is put
    # back; one whose replacement is in place is garbage, when it is provably a toolkit folder.
    (runs / ".trash-orphan-0000eeee").mkdir()
    (runs / ".trash-orphan-0000eeee" / "metrics.json").write_text("{}")
    (runs / "replaced").mkdir()
    (runs / ".trash-replaced-0000ffff").mkdir()
    (runs / ".trash-replaced-0000ffff" / RUN_MARKER).write_text("{}")
    (runs / "kept").mkdir()
    (runs / ".trash-kept-00001111").mkdir()  # no marker: not provably ours
    dead_lock = runs / ".gone.lock"  # a killed writer's lock file, unheld and old
    dead_lock.write_text("unlearn-lock 123\n")
    _age(dead_lock)
    (runs / ".fresh.lock").write_text("")  # just created by a writer about to lock it: left alone
    (runs / ".staging-not-ours").mkdir()  # not a name this toolkit makes: never touched
    notes = clean_stale(runs)
    holder.release(unlink=False)
    assert sorted(p.name for p in runs.iterdir()) == [
        ".fresh.lock", ".staging-live-0000bbbb", ".staging-not-ours", ".staging-old-0000dddd",
        ".staging-young-0000cccc", ".trash-kept-00001111", "kept", "orphan", "replaced"]
    assert (runs / "orphan" / "metrics.json").is_file()
    assert any("1.0 MiB" in n and "staging-dead" in n for n in notes)
    assert any(n.startswith("restored") and "orphan" in n for n in notes)
    assert any("trash-replaced" in n and n.startswith("removed") for n in notes)
    assert sum("no toolkit marker" in n for n in notes) == 2 and len(notes) == 5, notes


def test_files_of_the_user_that_look_like_ours_are_left_with_a_note(tmp_path):
    """`--output-dir proj` must not delete `proj/.notes.lock` or `proj/.staging-thesis-0badcafe/chapter1.txt`."""
    proj = tmp_path / "proj"
    thesis = proj / ".staging-thesis-0badcafe"
    thesis.mkdir(parents=True)
    (thesis / "chapter1.txt").write_text("years of work")
    (proj / ".notes.lock").write_text("my notes")
    (proj / ".old-run.lock").write_text("4242\n")  # a lock file of an older version: no marker, so not touched
    for path in (thesis / "chapter1.txt", thesis, proj / ".notes.lock", proj / ".old-run.lock"):
        _age(path)
    code, out, err = call_main(["example-data", str(proj / "ex")], tmp_path)
    assert code == 0, err
    assert (thesis / "chapter1.txt").read_text() == "years of work"
    assert (proj / ".notes.lock").read_text() == "my notes" and (proj / ".old-run.lock").is_file()
    assert out.count("no toolkit marker") == 3, out


def test_a_hard_link_at_a_lock_path_is_refused_and_its_target_kept(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    runs = tmp_path / "runs"
    runs.mkdir()
    os.link(precious, runs / ".victim.lock")
    code, _, err = call_main(["run", "--method", "npo", "--optimizer", "adamw", "--name", "victim"], tmp_path)
    assert code == 2 and "hard links" in err and ".victim.lock" in err, err
    assert precious.read_text() == "keep me"
    _age(runs / ".victim.lock")
    from unlearn.storage.runs import clean_stale

    notes = clean_stale(runs)  # a clean-up leaves it too
    assert precious.read_text() == "keep me" and (runs / ".victim.lock").exists() and "no toolkit marker" in notes[0]


def test_lock_files_are_never_followed_through_a_symlink(tmp_path):
    """A received run folder plants `attacks/.NAME.lock` -> some file: taking the lock must not truncate it."""
    from unlearn.core.errors import UserError
    from unlearn.storage.runs import staged_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attacks = tmp_path / "run" / "attacks"
    attacks.mkdir(parents=True)
    (attacks / ".rtn-4bit-channel.lock").symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"), staged_dir(attacks / "rtn-4bit-channel",
                                                                         overwrite=True):
        pass
    assert victim.read_text() == "keep me"


def test_names_must_stay_inside_the_output_folder(tmp_path):
    from unlearn.core.errors import UserError
    from unlearn.storage.runs import check_name, child

    for good in ("npo-hybrid", "seed 3", "zo_q4+lora", "αβ"):
        assert check_name(good) == good
    for bad in ("", " ", ".", "..", "a/b", "../x", "/abs", "a\\b", "a\0b", "tab\there", ".hidden", "x" * 201):
        with pytest.raises(UserError):
            check_name(bad)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "escape").symlink_to(tmp_path)
    assert child(tmp_path / "out", "fine") == tmp_path / "out" / "fine"
    with pytest.raises(UserError, match="resolves outside"):
        child(tmp_path / "out", "escape")


# ----------------------------------------------------------------------------- real signals, real processes


def _start(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "UNLEARN_CACHE": str(cache), "UNLEARN_THREADS": "1"}
    env.pop("UNLEARN_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "unlearn", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run to start training")
        time.sleep(0.1)


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated")])
def test_interrupt_is_an_error_and_leaves_nothing(tmp_path, tiny_model_dir, signum, code, word):
    runs = tmp_path / "runs"
    proc = _start(["run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps",
                   "100000", "--batch-size", "2", "--name", "long", "-q", *TINY_BENCH], tmp_path, tmp_path / "cache")
    try:
        # Training has started once the staging folder holds the step log.
        _wait_for(lambda: any(runs.glob(".staging-long-*/log.jsonl")) or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed check must not leave a 100000-step run behind on the machine
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: {word}"
    assert "Traceback" not in err
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def test_kill_9_leaves_nothing_half_written():
    """Two trials of tests/kill_trials.py (one `run`, one `attack`); the script runs ten for the issue's check."""
    from tests.kill_trials import main

    assert main(["--trials", "2", "--seed", "3"]) == 0


def test_a_received_folder_cannot_redirect_our_writes(tmp_path):
    """Symlinks planted in a received runs folder: attack results are not written through `attacks/`, and the
    report replaces a `report.md` link instead of overwriting the file it points at."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "runs" / "received"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("benchmark: embedded\n")
    (run / "metrics.json").write_text(json.dumps({"method": "npo", "optimizer": "zo",
                                                  "metrics": {"forget/mcq_acc": 0.3}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "attacks").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = call_main(["attack", "--run", str(run), "--quantize", "rtn4"], tmp_path)
    assert code == 2 and "is not a plain folder inside the run" in err
    assert not any(elsewhere.iterdir())

    (run / "attacks").unlink()
    (tmp_path / "runs" / "report.md").symlink_to(victim)
    code, out, err = call_main(["report", str(tmp_path / "runs")], tmp_path)
    assert code == 0, err
    assert victim.read_text() == "keep me"
    report = tmp_path / "runs" / "report.md"
    assert not report.is_symlink() and "| received |" in report.read_text()


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A folder holding runs/base and the cache it was made with: made once, copied by each race below."""
    from tests.kill_trials import run_args

    folder = tmp_path_factory.mktemp("made")
    env = {**os.environ, "UNLEARN_CACHE": str(folder / "cache"), "UNLEARN_THREADS": "1"}
    made = subprocess.run([sys.executable, "-m", "unlearn", *run_args(tiny_model_dir, "base")], cwd=folder,
                          env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return folder


@pytest.mark.parametrize("reader", ["eval", "attack"])
def test_an_overwrite_is_refused_while_eval_or_attack_holds_the_run(tmp_path, tiny_model_dir, made_run, reader):
    """The issue's race: `eval --run runs/W` (or `attack --run`) is paused mid-way, `run --name W --overwrite`
    is given meanwhile, then the reader resumes. The overwrite is refused in one line; the reader finishes; what is
    on disk is one run's results (measured again, undisturbed, the same numbers)."""
    from tests.kill_trials import ATTACK_ARGS, EVAL_ARGS, _metrics, _same, run_args

    for part in ("runs", "cache"):
        shutil.copytree(made_run / part, tmp_path / part, symlinks=True)
    cache = tmp_path / "cache"
    env = {**os.environ, "UNLEARN_CACHE": str(cache), "UNLEARN_THREADS": "1"}
    lock = tmp_path / "runs" / ".base.lock"
    proc = _start(EVAL_ARGS if reader == "eval" else ATTACK_ARGS, tmp_path, cache)
    try:
        _wait_for(lambda: lock.exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGSTOP)
        # In this process: the refusal comes before any model loads, so a new interpreter's start-up would be
        # most of what this call costs.
        writer = cli(*run_args(tiny_model_dir, "base", steps=10, seed=5), cwd=tmp_path,
                     env={"UNLEARN_CACHE": str(cache)})
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert writer.returncode == 2, writer.stderr
    assert writer.stderr.strip().splitlines() == [
        "error: runs/base is being read by another process (an eval, attack or report of it); "
        "wait for it to finish or choose another name"]
    record = tmp_path / "runs" / "base" / ("metrics.json" if reader == "eval"
                                           else "attacks/rtn-4bit-channel/metrics.json")
    before = _metrics(record)
    again = subprocess.run([sys.executable, "-m", "unlearn", *(EVAL_ARGS if reader == "eval" else ATTACK_ARGS)],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _same(before, _metrics(record))
    assert not lock.exists()  # the last reader removes it


def test_the_command_takes_interrupts_before_its_heavy_imports():
    """The handlers are in place before typer, rich, numpy or torch start importing."""
    script = ("import signal, sys\nimport unlearn.core.interrupts as e\ne.install_handlers()\n"
              "print(sorted(m for m in ('numpy', 'torch', 'typer', 'rich') if m in sys.modules))\n"
              "print(signal.getsignal(signal.SIGINT) is e._raise_interrupted)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            preexec_fn=sigint_as_in_a_terminal)
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stderr


def test_ctrl_c_during_start_up_is_130_and_one_line(tmp_path):
    """Ctrl-C about 0.5 s after launch used to give rc 1 and an internal RecursionError from a half-imported numpy
    (2 tries in 10). Signals spread over the whole start-up of `unlearn methods` (imports, then the listing)."""
    interrupted = 0
    for i in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "unlearn", "methods"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal)
        time.sleep(0.1 + 0.18 * i)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # it had finished
        interrupted += 1
        if proc.returncode == -signal.SIGINT:
            # Killed by the signal itself (a shell shows 130): before Python's start-up put any handler in place,
            # or after the command finished, while the interpreter shuts down. Nothing is printed then.
            assert err == "", err
            continue
        assert proc.returncode == 130, (0.1 + 0.18 * i, err)
        assert err.strip().splitlines() == ["error: interrupted"], err
    assert interrupted >= 4


def test_a_report_leaves_out_a_run_being_written_and_says_so(tmp_path):
    from unlearn.storage.locks import claim

    runs = tmp_path / "runs"
    for name, acc in (("done", 0.25), ("busy", 0.5)):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps({"method": "npo", "optimizer": "adamw",
                                                              "metrics": {"forget/mcq_acc": acc}}))
    with claim(runs / "busy"):  # what an `--overwrite` of it holds while it trains
        code, out, err = call_main(["report", str(runs)], tmp_path)
    assert code == 0, err
    assert f"note: left out busy: run {runs / 'busy'} is being written by another process (pid {os.getpid()})" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert any("| done |" in row for row in rows) and not any("| busy |" in row for row in rows)
    assert sorted(p.name for p in runs.iterdir()) == ["busy", "done", "report.csv", "report.md"]


def test_an_interrupt_during_an_import_is_raised_after_it(tmp_path):
    """Raised inside an import, the interrupt could land in native code called back from Python (torch's import
    via pybind11) and abort the process (exit -6, seen once in 12 start-up tries). It is delivered again until it
    lands outside every import: the module imports whole, then the interrupt is raised."""
    (tmp_path / "interrupted_module.py").write_text(
        "import signal\nsignal.raise_signal(signal.SIGINT)\nCOMPLETE = True\n")
    script = ("import sys, time\nfrom unlearn.core.interrupts import Interrupted, install_handlers\n"
              "install_handlers()\n"
              f"sys.path.insert(0, {str(tmp_path)!r})\n"
              "try:\n    import interrupted_module\n    print('imported', interrupted_module.COMPLETE)\n"
              "    time.sleep(5)\n    print('not interrupted')\n"
              "except Interrupted:\n    print('interrupted after the import', 'interrupted_module' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            preexec_fn=sigint_as_in_a_terminal)
    assert result.stdout.splitlines() == ["imported True", "interrupted after the import True"], result.stderr
