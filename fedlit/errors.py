"""User-facing errors.

Anything a user can cause (a bad config value, a missing data root, an unknown name) raises
:class:`FedlitError` with a one- or two-line message that names the problem *and* the fix. The CLI
prints ``error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib


class FedlitError(Exception):
    """An error caused by user input; its message is shown as-is, without a traceback."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> FedlitError:
    """``unknown dataset 'shapez' (did you mean 'shapes'?); valid: a, b, c``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if len(valid) > 15:
        return FedlitError(f"unknown {kind} '{name}'{hint}; `fedlit {kind}s` lists the {len(valid)} valid ones")
    return FedlitError(f"unknown {kind} '{name}'{hint}; valid {kind}s: {', '.join(sorted(valid))}")
