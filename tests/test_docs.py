"""The README's quick start is the front door: CI must run exactly its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick_start, flags=re.S)
    assert len(commands) == 2, "the quick start holds exactly two commands"
    assert "unlearn run --method npo --optimizer hybrid" in commands[0]
    assert commands[1].strip() in (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip().endswith("pytest -q")


def test_the_findings_quote_their_study_run_unchanged():
    """docs/FINDINGS.md says its tables are the shipped study's summary.md, copied unchanged, from a run of the study
    file as shipped: a table edited by hand, or a study file changed without running it again, fails here."""
    findings = (ROOT / "docs" / "FINDINGS.md").read_text()
    summary = (ROOT / "docs" / "findings" / "summary.md").read_text()
    heading = "## The run's tables (`docs/findings/summary.md`, unchanged)\n"
    quoted = findings.split(heading, 1)[1].split("\n## Plots")[0]
    tables = summary.split("\n## Forget level", 1)[1].split("\n## Plots")[0]
    assert quoted.strip() == ("### Forget level" + tables).replace("\n## ", "\n### ").strip()
    assert (ROOT / "docs" / "findings" / "study.yaml").read_text() == \
        (ROOT / "configs" / "study" / "downgrade.yaml").read_text(), "the shipped study changed: run it again"


def test_the_readme_layout_names_every_module():
    """The README's Layout block names every module of the package, so it cannot silently fall behind the tree."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", layout))
    folders = [ROOT / "unlearn", ROOT / "unlearn" / "recipes", ROOT / "unlearn" / "perf", ROOT / "unlearn" / "optim",
               ROOT / "benchmarks", ROOT / "benchmarks" / "muse", ROOT / "attacks"]
    missing = sorted(f"{folder.relative_to(ROOT)}/{path.name}" for folder in folders for path in folder.glob("*.py")
                     if path.stem != "__init__" and path.stem not in words)
    assert missing == [], f"modules the README's Layout does not name: {missing}"
