"""Running the ``dualnet`` command in the test process and reading stderr as a terminal shows it."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from dualnet.cli import main


def run_dualnet(argv: Sequence, capfd) -> Tuple[int, str, str]:
    """``dualnet ARGV`` in this process: (exit code, stdout, stderr) as the terminal gets them
    (``capfd``: file-descriptor level, so ITK's or torch's own messages are caught too)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def visible_lines(text: str) -> List[str]:
    """The lines a terminal shows: progress bars redraw with \\r, so only what follows the last \\r stays."""
    return [line.rsplit("\r", 1)[-1].strip() for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]
