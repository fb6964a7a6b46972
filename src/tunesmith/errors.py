"""The one exception type for user mistakes.

The CLI turns a `TunesmithError` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """A mistake the user can fix: bad input, a missing file, an invalid recipe value."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location the way every tunesmith error names it: `file:line: field`."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field:
        text += f": {field}"
    return text
