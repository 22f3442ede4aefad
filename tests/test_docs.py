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
