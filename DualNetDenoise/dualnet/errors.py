"""Exceptions with one-line messages that name the problem and the file."""

from __future__ import annotations


class DualNetError(Exception):
    """Base class of every error the package raises on purpose.

    The CLI prints ``str(err)`` as a single line and exits non-zero.
    """


class InputError(DualNetError, ValueError):
    """Bad user input: unreadable file, wrong dimensionality, NaN voxels, mismatched geometry."""


class ModelError(DualNetError):
    """A model file that is missing, corrupt, tampered with or incompatible."""


class CancelledError(DualNetError):
    """Raised inside long work when the caller asked to stop."""
