"""How an error is told in one line: the core's refusals and every script's ``error:`` line
use these two, so that a message reads the same wherever it is printed."""

from __future__ import annotations


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error (or of a text); never raises, even when empty:
    an error with no message is named by its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def described(error: BaseException) -> str:
    """``Type: first line``, for an error whose type says as much as its message (a
    library's, not one of ours)."""
    return f"{type(error).__name__}: {first_line(error)}"
