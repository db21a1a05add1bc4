"""The tests' one way to wait: a condition and a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str, *, poll: float = 0.2,
               give_up: Callable[[], str | None] | None = None) -> T:
    """Call ``condition`` until it returns something true, and return that.

    Fails with ``AssertionError`` saying ``what`` was awaited when ``timeout`` seconds pass,
    or at once when ``give_up`` returns a reason (a process that ended, say): waiting on
    would prove nothing more. The condition is tried once more after the deadline, so a
    slow machine that gets there at the last moment still passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        reason = give_up() if give_up is not None else None
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            found = condition()
            if found:
                return found
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(poll)
