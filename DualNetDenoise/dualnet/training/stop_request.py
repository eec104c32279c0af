"""Asking a training run in another process to stop, on every platform: a file in its run folder.

The run checks for :data:`STOP_FILE` before every step, as for SIGINT / SIGTERM: it writes its
checkpoint and ends (``CancelledError``; ``--resume`` continues it). A signal cannot do this from the
Slicer panel on Windows, where the child has no console to receive CTRL_BREAK.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

STOP_FILE = "stop.request"


def request_stop(run_dir: Union[str, os.PathLike]) -> Path:
    """Ask the run writing into ``run_dir`` to stop at its next step; the file's path."""
    path = Path(run_dir) / STOP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("stop\n", encoding="utf-8")
    return path


def stop_requested(run_dir: Union[str, os.PathLike]) -> bool:
    return (Path(run_dir) / STOP_FILE).exists()


def clear_stop(run_dir: Union[str, os.PathLike]) -> None:
    """Remove a stop request (a run starting, or one that has stopped)."""
    try:
        (Path(run_dir) / STOP_FILE).unlink()
    except FileNotFoundError:
        pass
