"""User-facing errors. The CLI prints them without a traceback (unless --debug)."""

from __future__ import annotations

from collections.abc import Iterable


class FedMobiLLMError(Exception):
    """An error caused by input or environment that the user can fix.

    ``hint`` says how to fix it; it is printed on its own line after the message.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the closest of ``known`` to a mistyped ``name``, or ""
    where none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
