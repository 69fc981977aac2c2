"""The documentation's Python examples run: every fenced ``python`` block of ``docs/*.md`` is executed, each in its own
temporary directory, except a block whose first line is ``# not run: <why>`` (the convention of
docs/development.md). Examples use generated data and a tiny model, so each takes seconds on one CPU thread."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
# A fenced block opening with ```python (possibly indented, inside a list item) up to the closing fence.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL)
NOT_RUN = "# not run:"


def python_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every python block of the documentation, ``where`` as ``page.md:line``."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{page.name}:{line}", textwrap.dedent(match.group("code"))))
    return blocks


BLOCKS = python_blocks()


def test_the_documentation_has_runnable_examples() -> None:
    runnable = [where for where, code in BLOCKS if not code.startswith(NOT_RUN)]
    assert len(runnable) >= 3, f"the fence pattern found only {runnable}"


@pytest.mark.parametrize("where, code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_python_block_runs(where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = code.splitlines()[0] if code.strip() else ""
    if first.startswith(NOT_RUN):
        reason = first.removeprefix(NOT_RUN).strip()
        assert reason, f"{where}: say why the block is not run: '{NOT_RUN} <why>'"
        pytest.skip(f"{where}: {reason}")
    monkeypatch.chdir(tmp_path)  # examples write their run directories (runs/...) here
    exec(compile(code, where, "exec"), {"__name__": "__main__"})
