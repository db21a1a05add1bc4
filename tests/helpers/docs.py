"""The code the docs show, as tests run it."""

from __future__ import annotations

from steps.tracking.runtime.project import PROJECT_DIR


def documented_python(page: str, heading: str) -> str:
    """The first ```python block under ``heading`` in docs/``page``."""
    text = (PROJECT_DIR / "docs" / page).read_text()
    section = text[text.index(heading):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]
