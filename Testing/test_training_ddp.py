"""Distributed training: ``torch.distributed.run`` with 2 CPU processes (gloo) on a tiny config.

Checks that both ranks train in lock-step, only rank 0 writes the checkpoint, log and model,
and the exported model loads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "DualNetDenoise"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_ddp_two_cpu_processes(tmp_path, mri_crop):
    pytest.importorskip("dualnet.degrade")
    pytest.importorskip("dualnet.modelfile")
    from dualnet.io import Volume, write_volume
    from dualnet.training.config import DataSource, TrainConfig
    from dualnet.training.trainer import load_checkpoint

    write_volume(Volume(mri_crop[:, :48, :48]), tmp_path / "a.nii.gz")
    write_volume(Volume(mri_crop[:, 16:, 16:]), tmp_path / "b.nii.gz")
    cfg = TrainConfig(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=2, steps=4, val_every=2,
                      checkpoint_every=2, log_every=1, val_patches=2, device="cpu", threads=1, lr=1e-3,
                      warmup_steps=1, elastic_prob=0.0,
                      data=[DataSource(str(tmp_path / "a.nii.gz")), DataSource(str(tmp_path / "b.nii.gz"), split="val")])
    cfg.save(tmp_path / "c.toml")
    env = dict(os.environ, PYTHONPATH=str(CORE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "dualnet.training.cli", "train", "--config", str(tmp_path / "c.toml"),
           "--out", str(tmp_path / "run"), "--progress-json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l.split(" ", 1)[1]) for l in proc.stdout.splitlines() if l.startswith("DUALNET_PROGRESS")]
    steps = [d["step"] for d in lines if d.get("event") == "step"]
    assert steps == [1, 2, 3, 4]  # rank 0 only: each step reported once
    assert lines[-1]["event"] == "done"
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["step"] == 4
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoint.pt", "config.toml", "loss_curve.png", "model.json", "model.safetensors", "train_log.csv"]
    from dualnet import modelfile

    model, card = modelfile.load_model(run / "model.safetensors", "cpu")
    assert card["training"]["steps"] == 4
    assert all(np.isfinite(v.numpy()).all() for v in model.state_dict().values())
