"""scripts/gate_curve.py: every kept version of a modality's model scored again on today's held-out
cases against BM4D, with its lineage's training time from the cards (the real weights folder, the
real ultrasound config and frames from ``../shared/data``, the real BM3D)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gate_curve import versions  # noqa: E402
from model_table import lineage_runs  # noqa: E402

from dualnet.modelfile import default_model_path, read_card  # noqa: E402


def test_lineage_runs_counts_every_run_oldest_first():
    card = {"training": {"steps": 30, "seconds": 180.0},
            "initialised_from": {"lineage": [{"steps": 10, "seconds": 60.0}], "training": {"steps": 20, "seconds": 120.0}}}
    assert lineage_runs(card) == [(10, 1.0), (20, 2.0), (30, 3.0)]
    assert lineage_runs({"training": {"steps": 5, "training_seconds": 30.0}}) == [(5, 0.5)]


@pytest.mark.parametrize("modality", ["mri", "ct", "us"])
def test_versions_are_the_kept_ones_in_version_order_then_the_shipped_model(modality):
    found = versions(modality)
    labels = [label for label, _ in found]
    assert labels[-1] == "shipped" and found[-1][1] == default_model_path(modality)
    assert not any("not_shipped" in p.name for _, p in found)
    numbers = [(int(label[1:].rstrip("abcdefghijklmnopqrstuvwxyz")), label) for label in labels[:-1]]
    assert numbers == sorted(numbers) and len(numbers) >= 2  # v10 after v9, v3a after v3
    assert all(p.is_file() for _, p in found)


def test_the_curve_scores_every_version_against_bm3d_in_one_run(shared_data, tmp_path):
    out = tmp_path / "us.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gate_curve.py"), "us", "--max-cases", "1",
                          "--data-dir", str(shared_data), "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    assert [r["version"] for r in got["rows"]] == [label for label, _ in versions("us")]
    base = got["baseline"]
    for row in got["rows"]:
        assert row["minus_bm4d"]["psnr"] == pytest.approx(row["psnr"] - base["psnr"], abs=1e-3)
    shipped = got["rows"][-1]
    card = read_card(default_model_path("us"))
    assert shipped["runs"] == len(lineage_runs(card)) and shipped["minutes"] > 60
    assert "| shipped |" in res.stdout and f"{base['psnr']:.2f}" in res.stdout
