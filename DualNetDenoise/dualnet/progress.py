"""Progress reporting and cancellation shared by the CLI, the Slicer side and scripts.

Long functions take ``progress: ProgressFn | None`` and ``cancel: CancelToken | None``.
``progress(fraction, message)`` receives a fraction in [0, 1]; the function calls
``check_cancel(cancel)`` between units of work and raises :class:`CancelledError`.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import CancelledError

ProgressFn = Callable[[float, str], None]


class CancelToken:
    """Thread-safe flag the caller sets to stop long work at the next check point."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def check_cancel(cancel: Optional[CancelToken]) -> None:
    """Raise :class:`CancelledError` if ``cancel`` was set."""
    if cancel is not None and cancel.cancelled:
        raise CancelledError("cancelled by the user")


def report(progress: Optional[ProgressFn], fraction: float, message: str = "") -> None:
    """Call ``progress`` if given, clamping the fraction to [0, 1]."""
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0), message)


def scaled(progress: Optional[ProgressFn], start: float, stop: float) -> Optional[ProgressFn]:
    """A progress function mapping [0, 1] of a sub-task onto [start, stop] of the whole."""
    if progress is None:
        return None

    def inner(fraction: float, message: str = "") -> None:
        report(progress, start + (stop - start) * fraction, message)

    return inner
