"""Relearning and quantization attacks on a tiny run, through the CLI, plus the recovery maths."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import TINY_BENCH, cli, make_model
from unlearn.core.errors import UserError
from unlearn.recipes.attack import recovery_ratio
from unlearn.tasks.task import split_items


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished tiny `unlearn run`, copied fresh into each test's folder by `workdir`."""
    root = tmp_path_factory.mktemp("attack-runs")
    result = cli("run", "--method", "npo", "--optimizer", "adamw", "--model", str(tiny_model_dir), "--steps", "2",
                 "--batch-size", "2", "--name", "tiny", "-q", *TINY_BENCH, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture()
def workdir(tmp_path, tiny_run) -> Path:
    shutil.copytree(tiny_run / "runs", tmp_path / "runs")
    shutil.copytree(tiny_run / "cache", tmp_path / "cache")
    return tmp_path


def test_recovery_ratio():
    assert recovery_ratio(0.5, 0.2, 1.0) == (pytest.approx(0.375), "ok")
    assert recovery_ratio(0.2, 0.2, 1.0)[0] == 0.0
    assert recovery_ratio(1.0, 0.2, 1.0)[0] == pytest.approx(1.0)
    ratio, note = recovery_ratio(0.9, 0.8, 0.8)
    assert ratio is None and "undefined" in note
    # The declared direction decides what "unlearning moved it" means.
    assert recovery_ratio(3.0, 4.0, 2.0, better="higher") == (pytest.approx(0.5), "ok")
    assert recovery_ratio(3.0, 2.0, 4.0, better="higher")[0] is None
    assert recovery_ratio(-20.0, -5.0, -40.0, better="zero") == (pytest.approx(15 / 35), "ok")


def test_split_items_is_seeded_and_disjoint():
    used, unused = split_items(10, None, seed=3)
    assert len(used) == 5 and sorted(used + unused) == list(range(10))
    assert split_items(10, None, seed=3) == (used, unused)
    assert split_items(10, None, seed=4) != (used, unused)
    with pytest.raises(UserError, match="between 1 and 9"):
        split_items(10, 10, seed=0)
    # When recovery is measured on other items (a benchmark's questions), every passage may be relearned on.
    assert split_items(1, None, seed=0, hold_out=False) == ([0], [])
    assert split_items(4, 4, seed=0, hold_out=False) == ([0, 1, 2, 3], [])


def test_relearn_attack_writes_curve_and_report(workdir):
    result = cli("attack", "--run", "runs/tiny", "--relearn", "--steps", "3", "--checkpoints", "0,2,5",
                 "--batch-size", "2", "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    record = json.loads((workdir / "runs/tiny/attacks/relearn-steps3-batchsize2/metrics.json").read_text())
    assert [p["step"] for p in record["curve"]] == [0, 2, 3]
    details = record["details"]
    assert not set(details["used_forget_indices"]) & set(details["unseen_forget_indices"])
    assert "forget/mcq_acc" in record["metrics"] and record["recovery"]["metric"] == "forget_unseen_acc"
    assert record["curve_metrics"][0]["key"] == "forget_unseen_acc"
    curve = record["recovery"]["curve"]
    assert curve[0]["ratio"] in (0.0, None)  # at step 0 nothing can have come back yet
    assert record["recovery"]["unlearned"] == record["curve"][0]["forget_unseen_acc"]
    report = cli("report", "runs", cwd=workdir)
    assert report.returncode == 0, report.stderr
    assert "after relearn-steps3-batchsize2" in report.stdout and "forget (unseen) ↓" in report.stdout
    header, *lines = [line for line in report.stdout.splitlines() if line.startswith("| ")]
    titles = [t.strip() for t in header.strip("|").split("|")]
    row = next(line for line in lines if line.startswith("| tiny "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ratio = record["recovery"]["ratio"]  # the runs table carries the attack's recovery ratio beside its value
    if ratio is None:  # the tiny target may not know the unseen facts: no ratio, and no column of n/a
        assert "recovery relearn-steps3-batchsize2" not in titles
    else:
        assert cells[titles.index("recovery relearn-steps3-batchsize2")] == f"{ratio:.3f}"
    assert (workdir / "runs/attack_curves.png").stat().st_size > 1000
    assert "attack_curves.png" in (workdir / "runs/report.md").read_text()


def test_relearn_lora_out_of_domain(workdir):
    result = cli("attack", "--run", "runs/tiny", "--relearn", "--lora", "--lora-rank", "2", "--out-of-domain",
                 "--steps", "2", "--batch-size", "2", "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    folder = workdir / "runs/tiny/attacks/relearn-ood-lora-steps2-batchsize2-lorarank2"  # non-default settings named
    record = json.loads((folder / "metrics.json").read_text())
    assert record["settings"]["domain"] == "retain" and record["settings"]["lora"]
    assert record["kind"] == "relearn" and record["settings"]["lora_rank"] == 2


@pytest.mark.parametrize("quantize", ["rtn4", "8bit"])
def test_quantize_attack(workdir, quantize):
    result = cli("attack", "--run", "runs/tiny", "--quantize", quantize, "-q", cwd=workdir)
    assert result.returncode == 0, result.stderr
    name = {"rtn4": "rtn-4bit-channel", "8bit": "bnb-8bit"}[quantize]
    record = json.loads((workdir / f"runs/tiny/attacks/{name}/metrics.json").read_text())
    assert 0.0 <= record["metrics"]["forget/mcq_acc"] <= 1.0 and "recovery" in record


@pytest.mark.parametrize("args, message", [
    (["--run", "runs/missing", "--quantize", "4bit"], "does not exist"),
    (["--run", "runs/tiny", "--quantize", "3bit"], "unsupported --quantize '3bit'"),
    (["--run", "runs/tiny"], "choose one attack"),
    (["--run", "runs/tiny", "--relearn", "--quantize", "8bit"], "choose one attack"),
    (["--run", "runs/tiny", "--relearn", "--samples", "1000"], "relearning samples must be between"),
    (["--run", "runs/tiny", "--quantize", "8bit", "--steps", "3"], "--steps is not a setting of attack 'quantize'"),
    (["--run", "runs/tiny", "--attack", "nope"], "unknown attack 'nope'; choose from: mia, quantize, relearn"),
    (["--run", "runs/tiny", "--attack", "quantize", "--set", "attack.bits=5"], "bnb quantization supports 4, 8"),
    (["--run", "runs/tiny", "--attack", "relearn", "--set", "attack.steps=0"], "attack.steps must be"),
    (["--run", "runs/tiny", "--attack", "relearn", "--set", "attack.bogus=1"], "unknown key(s) in 'attack': bogus"),
    (["--run", "runs/tiny", "--quantize", "8bit", "--set", "train.seed=1"], "--set goes with --model"),
])
def test_attack_errors(workdir, args, message):
    result = cli("attack", *args, "-q", cwd=workdir)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_attack_run_without_model(workdir):
    shutil.rmtree(workdir / "runs/tiny/model")
    shutil.rmtree(workdir / "runs/tiny/attacks", ignore_errors=True)
    before = sorted(p.name for p in (workdir / "runs/tiny").iterdir())
    result = cli("attack", "--run", "runs/tiny", "--quantize", "8bit", cwd=workdir)
    assert result.returncode == 2 and "has no model/" in result.stderr
    assert sorted(p.name for p in (workdir / "runs/tiny").iterdir()) == before  # nothing half-written


def test_attack_set_form_matches_short_form(workdir):
    """`--attack quantize --set attack.…` is the long form of `--quantize`: same folder, same record."""
    short = cli("attack", "--run", "runs/tiny", "--quantize", "rtn4", "-q", cwd=workdir)
    assert short.returncode == 0, short.stderr
    path = workdir / "runs/tiny/attacks/rtn-4bit-channel/metrics.json"
    first = json.loads(path.read_text())
    long = cli("attack", "--run", "runs/tiny", "--attack", "quantize", "--set", "attack.method=rtn",
               "--set", "attack.bits=4", "-q", cwd=workdir)
    assert long.returncode == 0, long.stderr
    second = json.loads(path.read_text())
    assert first["settings"] == second["settings"] == {"method": "rtn", "bits": 4, "quant_type": "nf4",
                                                       "group_size": None}
    assert first["metrics"] == second["metrics"]


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, tokenizer) -> Path:
    """A tiny run on a model 64 wide (bitsandbytes 4-bit on some CPUs needs widths divisible by 64)."""
    root = tmp_path_factory.mktemp("wide-run")
    model_dir = root / "model"
    make_model(len(tokenizer), hidden=64, layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = cli("run", "--method", "graddiff", "--optimizer", "adamw", "--model", str(model_dir), "--steps", "2",
                 "--batch-size", "2", "--name", "wide", "-q", *TINY_BENCH, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_report_shows_every_attack_folder(wide_run):
    """RTN, FP4, LoRA relearning and out-of-domain relearning all land in the report and report.md, each with
    its settings and recovery ratio (the report used to show only bnb-8bit, bnb-4bit-nf4 and relearn)."""
    attacks = {"rtn-4bit-channel": ["--quantize", "rtn4"],
               "bnb-4bit-fp4": ["--quantize", "4bit", "--quant-type", "fp4"],
               "relearn-lora-steps2-batchsize2-lorarank2": ["--relearn", "--lora", "--lora-rank", "2", "--steps", "2",
                                                            "--batch-size", "2"],
               "relearn-ood-steps2-batchsize2": ["--relearn", "--out-of-domain", "--steps", "2", "--batch-size", "2"]}
    for folder, args in attacks.items():
        result = cli("attack", "--run", "runs/wide", *args, "-q", cwd=wide_run)
        assert result.returncode == 0, (folder, result.stderr)
    report = cli("report", "runs", cwd=wide_run)
    assert report.returncode == 0, report.stderr
    page = (wide_run / "runs/report.md").read_text()
    rows = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] == "wide" and cells[1] in attacks:
            rows[cells[1]] = cells
    assert set(rows) == set(attacks)
    header = next(line for line in page.splitlines() if line.startswith("| run | attack |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    runs_header = next(line for line in page.splitlines() if line.startswith("| run | benchmark |"))
    runs_columns = [c.strip() for c in runs_header.strip("|").split("|")]
    runs_row = next([c.strip() for c in line.strip("|").split("|")] for line in page.splitlines()
                    if line.startswith("| wide | embedded |"))
    for folder, cells in rows.items():
        record = json.loads((wide_run / "runs/wide/attacks" / folder / "metrics.json").read_text())
        row = dict(zip(columns, cells, strict=True))
        assert row["kind"] == record["kind"]
        ratio = record["recovery"]["ratio"]
        assert row["recovery ratio"] == (f"{ratio:.3f}" if ratio is not None else record["recovery"]["note"])
        for key in ("unlearned", "attacked", "target"):  # read back from the record, for every kind of attack
            assert row[key] == f"{record['recovery'][key]:.3f}", (folder, key, row)
        for key, value in record["settings"].items():
            if value is not None:
                assert f"{key}={value}" in row["settings"]
        assert f"after {folder}" in report.stdout  # a runs-table column per attack folder too
        if ratio is not None:  # and its recovery ratio beside it, the same number as the attacks table's
            assert runs_row[runs_columns.index(f"recovery {folder}")] == f"{ratio:.3f}"
    # The tiny target knows nothing, so no ratio above is defined: give one attack a hand-made recovery and
    # read it back from the runs table (the attacks table's own check is the loop above).
    copy = wide_run / "copy"
    shutil.copytree(wide_run / "runs", copy / "runs")
    folder = next(iter(rows))
    path = copy / "runs/wide/attacks" / folder / "metrics.json"
    record = json.loads(path.read_text())
    record["recovery"].update(unlearned=0.2, attacked=0.4, target=1.0, ratio=0.25)
    path.write_text(json.dumps(record))
    again = cli("report", "runs", cwd=copy)
    assert again.returncode == 0, again.stderr
    page = (copy / "runs/report.md").read_text()
    runs_header = next(line for line in page.splitlines() if line.startswith("| run | benchmark |"))
    runs_columns = [c.strip() for c in runs_header.strip("|").split("|")]
    runs_row = next([c.strip() for c in line.strip("|").split("|")] for line in page.splitlines()
                    if line.startswith("| wide | embedded |"))
    assert runs_row[runs_columns.index(f"recovery {folder}")] == "0.250"
    assert "quant_type=fp4" in rows["bnb-4bit-fp4"][3] and "domain=retain" in rows["relearn-ood-steps2-batchsize2"][3]
    csv_rows = (wide_run / "runs/report-attacks.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(attacks)


def test_saved_models_probes_are_measured_once_per_process_and_reused_unchanged(workdir, monkeypatch):
    """Relearning attacks on one run share the target, benchmark, split and scoring: a later one reuses the target's
    measurement (one target load fewer) and the unlearned model's step-0 measurement, out-of-domain included (it
    holds out the same facts), and records the same values; another split does not share them."""
    import unlearn.attacks.relearn as relearn_module
    from unlearn.recipes.attack import attack_settings, run_attack, subject_from_run

    monkeypatch.setenv("UNLEARN_CACHE", str(workdir / "cache"))
    monkeypatch.setattr(relearn_module, "_PROBES", {})
    loads: list[str] = []
    probes: list[int] = []
    real_load = relearn_module.load_model

    def counting_load(spec, **kwargs):
        loads.append(str(spec))
        return real_load(spec, **kwargs)

    monkeypatch.setattr(relearn_module, "load_model", counting_load)
    records = []
    for overrides in (["attack.steps=2", "attack.batch_size=2"], ["attack.steps=3", "attack.batch_size=2"],
                      ["attack.steps=2", "attack.batch_size=2", "attack.domain=retain"],
                      ["attack.steps=2", "attack.batch_size=2", "attack.seed=7"]):
        subject = subject_from_run(workdir / "runs/tiny")
        assert subject.target_model  # the run records its target, so there is a target probe to share
        real_plan = subject.task.relearn_plan

        def counting_plan(*args, real_plan=real_plan):
            plan = real_plan(*args)
            def probe(*a, probe=plan.probe):
                probes.append(1)
                return probe(*a)
            return replace(plan, probe=probe)

        monkeypatch.setattr(subject.task, "relearn_plan", counting_plan)
        name, attack, settings = attack_settings("relearn", overrides=overrides)
        records.append(run_attack(subject, name, attack, settings, progress=False)[0])
    target = subject.target_model
    assert loads.count(target) == 2  # the first attack and the other split only
    # Probes: the first attack 3 (start, end, target); the next two only their end; the other split 3 again.
    assert len(probes) == 3 + 1 + 1 + 3
    first, second, ood, other_split = records
    assert first.curve[0] == second.curve[0] == ood.curve[0] and other_split.curve[0] != first.curve[0]
    assert first.recoveries[0].target == second.recoveries[0].target == ood.recoveries[0].target
    assert len(relearn_module._PROBES) == 4  # (start, target) × two splits
