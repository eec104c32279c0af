"""Shared pytest fixtures: where the real scans live, small real crops, a temporary folder.

The real scans are read from ``../shared/data`` beside the checkout (or ``$DUALNET_SHARED_DATA``);
nothing is downloaded. Tests that need them are skipped with a reason when they are absent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))  # the core, also when not pip-installed
# "auto" inference precision means fp32 in the suite (and its subprocesses) on every host, so the
# results are the same whether or not the CPU has AMX bf16; test_precision.py runs bf16 itself
os.environ["DUALNET_PRECISION"] = "float32"


def shared_data_dir() -> Path:
    env = os.environ.get("DUALNET_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"real scans not found at {path}")
    return path


@pytest.fixture(scope="session")
def mri_volume(shared_data):
    """The ADNI T1 MPRAGE as a Volume (int16, 1 mm, (z, y, x) = (170, 256, 256) after reading)."""
    from dualnet.io import read_volume

    return read_volume(shared_data / "mri" / "adni_mprage_t1.nii.gz")


@pytest.fixture(scope="session")
def mri_crop(mri_volume) -> np.ndarray:
    """A 40x64x64 (z, y, x) float32 crop through the brain of the real T1 scan."""
    arr = mri_volume.array
    zc, yc, xc = (s // 2 for s in arr.shape)
    return arr[zc - 20 : zc + 20, yc - 32 : yc + 32, xc - 32 : xc + 32].astype(np.float32)


@pytest.fixture(scope="session")
def ct_volume(shared_data):
    from dualnet.io import read_volume

    return read_volume(shared_data / "ct" / "totalseg_abdomen_ct.nii.gz")


@pytest.fixture(scope="session")
def us_image(shared_data):
    from dualnet.io import read_volume

    return read_volume(shared_data / "us" / "images" / "0001.png")


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread for inference (``DUALNET_NUM_THREADS``) and torch, restored afterwards:
    oversubscribed threads are very slow on a shared small machine."""
    import torch

    monkeypatch.setenv("DUALNET_NUM_THREADS", "1")
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)
