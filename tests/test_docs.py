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
    assert (ROOT / "docs" / "findings-gemma" / "study.yaml").read_text() == \
        (ROOT / "configs" / "study" / "gemma.yaml").read_text(), "the two-model study changed: run it again"


def _layout() -> dict[str, str]:
    """The README's Layout block as {folder: its text}: an entry starts at column 0 with a folder, and indented
    lines continue it."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    folder = None
    for line in block.strip("\n").splitlines():
        if line and not line[0].isspace():
            folder, _, text = line.partition(" ")
            entries[folder] = text
        elif folder is not None:
            entries[folder] += " " + line.strip()
    return entries


def _package_folders() -> list[Path]:
    """Every folder of the installed package: unlearn/ and its subpackages, benchmarks/, attacks/ and theirs."""
    roots = [ROOT / "unlearn", ROOT / "benchmarks", ROOT / "attacks"]
    return [f for root in roots for f in [root, *sorted(root.rglob("*"))]
            if f.is_dir() and (f / "__init__.py").is_file()]


def layout_problems(entries: dict[str, str]) -> list[str]:
    """What the Layout gets wrong against the tree: a package folder without an entry, an entry that is not a
    folder, a module or subpackage its folder's entry does not name."""
    folders = {f"{f.relative_to(ROOT)}/": f for f in _package_folders()}
    problems = [f"no entry for {name}" for name in sorted(set(folders) - set(entries))]
    problems += [f"{e} is not a folder" for e in sorted(entries) if not (ROOT / e).is_dir()]
    for name, folder in folders.items():
        text = entries.get(name, "")
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
        problems += [f"{name}{p.name} not named" for p in sorted(folder.glob("*.py"))
                     if p.stem not in ("__init__", "__main__") and p.stem not in words]
        problems += [f"{name}{p.name}/ not named" for p in sorted(folder.iterdir()) if (p / "__init__.py").is_file()
                     and f"{p.name}/" not in text and f"{name}{p.name}/" not in entries]
    return problems


def test_the_readme_layout_matches_the_tree():
    """Every package folder has its entry naming each of its modules, and every entry is a folder that exists, so
    the Layout cannot fall behind a move, an added module or a removed folder."""
    assert layout_problems(_layout()) == []


def test_the_layout_check_catches_a_moved_module_and_a_missing_folder():
    entries = _layout()
    moved = {**entries, "unlearn/storage/": entries["unlearn/storage/"].replace("records", "recs"),
             "unlearn/gone/": "x"}
    del moved["unlearn/core/"]
    assert {"no entry for unlearn/core/", "unlearn/gone/ is not a folder", "unlearn/storage/records.py not named",
            "unlearn/core/errors.py not named"} <= set(layout_problems(moved))


def test_every_experiment_file_is_a_valid_study():
    """docs/experiments/ holds study files that `unlearn study` runs: each is checked as the command checks it."""
    from unlearn.recipes.study.plan import load_study

    files = sorted((ROOT / "docs" / "experiments").glob("*.yaml"))
    assert files
    for path in files:
        assert load_study(path).cells, path


def test_the_extending_guide_shows_the_tested_example_whole():
    """docs/EXTENDING.md's example is the plug-in tests/test_extending.py installs and runs, not a copy that drifts."""
    guide = (ROOT / "docs" / "EXTENDING.md").read_text()
    example = (ROOT / "examples" / "unlearn-toy" / "unlearn_toy.py").read_text()
    shown = guide.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert shown + "\n" == example
    pyproject = (ROOT / "examples" / "unlearn-toy" / "pyproject.toml").read_text()
    toml = guide.split("```toml\n", 1)[1].split("\n   ```", 1)[0]
    assert "\n".join(line.removeprefix("   ") for line in toml.splitlines()) in pyproject
