"""`dualnet demo` (README command 1) on the bundled real T1 with a cheap method: every file it says it
writes, the metrics in demo.json, the PNG; a bad --methods is refused before any file (review, session 35:
the demo had no test, and `--methods "dualnet,"` failed only after writing outputs)."""

from __future__ import annotations

import json

import pytest

from dualnet.demo import run_demo
from dualnet.errors import InputError


def test_bad_methods_are_refused_before_any_file(tmp_path):
    for methods in ("dualnet,bogus", ",", "gaussian, nope"):
        with pytest.raises(InputError, match="--methods"):
            run_demo(tmp_path / "out", methods=methods, progress_mode="none")
    assert not (tmp_path / "out").exists()


def test_the_demo_writes_what_it_says(tmp_path):
    table = run_demo(tmp_path, methods="gaussian", progress_mode="none")
    names = {p.name for p in tmp_path.iterdir()}
    assert {"clean_lr.nii.gz", "noisy_lr.nii.gz", "denoised_gaussian.nii.gz", "demo.png", "demo.json"} <= names
    rows = json.loads((tmp_path / "demo.json").read_text(encoding="utf-8"))["results"]
    assert rows["gaussian"]["psnr_fg"] > rows["noisy"]["psnr_fg"]  # the filter did something real
    assert "gaussian" in table
