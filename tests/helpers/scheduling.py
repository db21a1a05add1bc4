"""The order in which pytest-xdist hands test files to its workers: longest first.

``--dist=loadfile`` gives each worker whole files (so a file's module fixtures are built
once) from one queue. xdist orders that queue by test count, which put the one-test,
three-minute first-run file and the three-test server file last: one worker ran them alone
at the end while the others stood idle (the workers ended 2.5 minutes apart). Longest
first (the LPT rule) lets them end together. Each file's time is read from
``tests/durations.json``, which ``pytest --store-durations`` updates after a run; a
file it does not know goes first, as it may be long. Only the order depends on it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

DURATIONS = Path(__file__).resolve().parents[1] / "durations.json"


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def read_durations(path: Path = DURATIONS) -> dict[str, float]:
    try:
        return {name: float(seconds) for name, seconds in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def longest_files_first(nodeids: list[str], durations: dict[str, float]) -> list[int]:
    """The positions of ``nodeids`` reordered so that their files come longest first (an
    unknown file first of all); tests keep their order within a file."""
    return sorted(range(len(nodeids)),
                  key=lambda i: -durations.get(file_of(nodeids[i]), float("inf")))


class DurationLog:
    """A plugin of the controlling process (``--store-durations``): each test file's seconds
    (setup, call and teardown of all its tests) as the workers' reports arrive, written to
    ``tests/durations.json`` when the run ends; files that did not run keep their time."""

    def __init__(self, path: Path = DURATIONS) -> None:
        self.path = path
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report) -> None:
        self.seconds[file_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session) -> None:
        if not self.seconds:
            return
        known = {**read_durations(self.path), **self.seconds}  # files not run keep theirs
        ordered = sorted(known.items(), key=lambda item: -item[1])
        self.path.write_text(json.dumps({name: round(seconds, 1) for name, seconds in ordered},
                                        indent=1) + "\n")
