"""saq-hf's one-line console messages: ``[saq-hf] ...`` status lines on stdout, ``[saq-hf] warning: ...`` on stderr.

Warnings from the library layers (the trainer) are issued with :func:`warnings.warn` as :class:`SAQHfWarning`, so
warning filters and ``pytest.warns`` see them; Python shows them as one ``[saq-hf] warning:`` line, without the file
name, line number and source line it prints for other warnings.
"""

import sys
import warnings

WARNING_PREFIX = "[saq-hf] warning: "


class SAQHfWarning(UserWarning):
    """A warning about a run's settings or outcome, shown as one ``[saq-hf] warning:`` line."""


def say(message: str) -> None:
    print(f"[saq-hf] {message}", flush=True)


def warn_line(message: str) -> None:
    """One ``[saq-hf] warning:`` line on stderr, printed at once (stdout stays the report)."""
    print(WARNING_PREFIX + message, file=sys.stderr, flush=True)


def warn(message: str, stacklevel: int = 3) -> None:
    """Issue ``message`` as a :class:`SAQHfWarning` (shown as one ``[saq-hf] warning:`` line)."""
    warnings.warn(message, SAQHfWarning, stacklevel=stacklevel)


_format_other_warnings = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None):
    if isinstance(category, type) and issubclass(category, SAQHfWarning):
        return f"{WARNING_PREFIX}{message}\n"
    return _format_other_warnings(message, category, filename, lineno, line)


# The documented hook for how warnings print; every category but saq-hf's keeps Python's own format.
if getattr(warnings.formatwarning, "__module__", None) != __name__:
    warnings.formatwarning = _format_warning
