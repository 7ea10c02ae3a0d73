"""The README's promises: its two commands come first, and its Python snippets run."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands():
    first = _blocks("bash")[0].strip().splitlines()
    assert first[0].startswith("pip install .") and "magnet-jax train" in first[0]
    assert first[1].startswith('pip install ".[test]"') and "pytest" in first[1]


def test_readme_python_snippets_run():
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), {})
