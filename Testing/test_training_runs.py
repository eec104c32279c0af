"""A training run's folder is its own: a resumed run must train what the checkpoint's run trained,
a fresh run never replaces another run's checkpoint, and a continuation into the folder of the model it
starts from is refused before any work (three faults found by a review in session 35)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dualnet.errors import CancelledError, InputError  # noqa: E402
from dualnet.progress import CancelToken  # noqa: E402
from dualnet.training.config import DataSource, TrainConfig  # noqa: E402
from dualnet.training.trainer import load_checkpoint, pretrain  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _config(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=16, batch_size=2, steps=6, lr=1e-3,
                warmup_steps=1, val_every=3, checkpoint_every=3, log_every=1, val_patches=2, num_workers=0,
                elastic_prob=0.0, device="cpu", seed=3, threads=1, lr_factor=1, min_foreground=0.0)
    base.update(kw)
    return TrainConfig(**base).validate()


def _cancelled_run(out: Path, data, cfg: TrainConfig, at: int = 3) -> None:
    token = CancelToken()

    def progress(fraction, message):
        if message.startswith(f"step {at}/"):
            token.cancel()

    with pytest.raises(CancelledError):
        pretrain(cfg, data=data, out_dir=out, progress=progress, cancel=token)


@pytest.fixture()
def crop(mri_crop):
    return [(np.ascontiguousarray(mri_crop[:8, :40, :40]), (1.0, 1.0, 1.0))]


def test_resume_refuses_other_settings_or_data_and_accepts_more_steps(tmp_path, crop, mri_crop):
    out = tmp_path / "run"
    cfg = _config()
    _cancelled_run(out, crop, cfg)
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    with pytest.raises(InputError, match=r"lr 0\.001 -> 0\.05.*modality|modality 'mri' -> 'ct'.*lr 0\.001 -> 0\.05"):
        pretrain(cfg.replace(lr=0.05, modality="ct"), data=crop, out_dir=out, resume=True)
    other = [(np.ascontiguousarray(mri_crop[8:16, :40, :40]), (1.0, 1.0, 1.0))]
    with pytest.raises(InputError, match="the voxels of 2 of the 2 images"):
        pretrain(cfg, data=other, out_dir=out, resume=True)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step  # nothing trained, nothing replaced
    allowed = cfg.replace(steps=8, threads=2, export_best=not cfg.export_best, val_patches=3)  # run control
    res = pretrain(allowed, data=crop, out_dir=out, resume=True)
    assert res.steps == 8


def test_a_fresh_run_never_replaces_a_stopped_runs_checkpoint(tmp_path, crop):
    from dualnet.training.trainer import stopped_run_step

    out = tmp_path / "run"
    _cancelled_run(out, crop, _config())
    before = (out / "checkpoint.pt").read_bytes()
    assert stopped_run_step(out) == 3
    with pytest.raises(InputError, match="a run stopped at step 3"):
        pretrain(_config(), data=crop, out_dir=out)
    assert (out / "checkpoint.pt").read_bytes() == before
    pretrain(_config(), data=crop, out_dir=out, resume=True)  # finished now: its model is exported
    assert stopped_run_step(out) is None
    assert pretrain(_config(seed=4), data=crop, out_dir=out).steps == 6  # a new run may replace a finished one


def test_a_stop_request_file_stops_a_run_with_its_checkpoint(tmp_path, crop):
    """How the Slicer panel asks its child to stop on every platform (no console for CTRL_BREAK on Windows)."""
    from dualnet.training.stop_request import STOP_FILE, request_stop

    out = tmp_path / "run"
    request_stop(out)  # a stale request from an earlier run is not for this one
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if message.startswith("step 2/"):
            request_stop(out)

    with pytest.raises(CancelledError, match="stop request"):
        pretrain(_config(steps=50), data=crop, out_dir=out, progress=progress)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2 and not (out / STOP_FILE).exists()


def test_continuing_a_model_into_its_own_folder_is_refused_before_any_step(tmp_path, crop):
    first = pretrain(_config(steps=2), data=crop, out_dir=tmp_path / "x")
    ck = (tmp_path / "x" / "checkpoint.pt").read_bytes()
    (tmp_path / "x" / "checkpoint.pt").unlink()  # not the fresh-run refusal: the model file itself
    with pytest.raises(Exception, match="output path is the input file"):
        pretrain(_config(steps=2, init_from=str(first.model_path)), data=crop, out_dir=tmp_path / "x")
    assert not (tmp_path / "x" / "checkpoint.pt").exists() and ck


def test_sigterm_to_the_process_group_with_data_workers_saves_a_checkpoint(tmp_path, crop):
    """What `timeout`, systemd or Slurm send: the workers died of it and the run ended with no checkpoint."""
    from dualnet.io import Volume, write_volume

    write_volume(Volume(crop[0][0]), tmp_path / "a.nrrd")
    cfg = _config(steps=100000, num_workers=1, val_every=100000, checkpoint_every=100000)
    cfg.replace(data=[DataSource(str(tmp_path / "a.nrrd"))]).save(tmp_path / "c.toml")
    env = dict(os.environ, PYTHONPATH=str(REPO / "DualNetDenoise"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dualnet", "train", "--config", str(tmp_path / "c.toml"), "--out",
                             str(tmp_path / "run"), "--progress-json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    start = time.time()
    for line in proc.stdout:
        if line.startswith("DUALNET_PROGRESS") and json.loads(line.split(" ", 1)[1]).get("step", 0) >= 3:
            break
        assert time.time() - start < 120, "no training step reported"
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] >= 3


def test_a_graceful_cancel_lets_the_run_write_its_checkpoint_and_kills_a_run_that_ignores_it(tmp_path, crop):
    """The training panel's Cancel killed the child at once (SIGKILL): every step since the last periodic
    checkpoint was lost, and a run cancelled before its first one could not be resumed at all."""
    sys.path.insert(0, str(REPO / "DualNetDenoise"))
    from DualNetDenoiseLib.process import ProcessRunner
    from dualnet.io import Volume, write_volume

    write_volume(Volume(crop[0][0]), tmp_path / "a.nrrd")
    cfg = _config(steps=100000, val_every=100000, checkpoint_every=100000)
    cfg.replace(data=[DataSource(str(tmp_path / "a.nrrd"))]).save(tmp_path / "c.toml")
    env = dict(os.environ, PYTHONPATH=str(REPO / "DualNetDenoise"), OMP_NUM_THREADS="1")
    steps = []
    runner = ProcessRunner([sys.executable, "-m", "dualnet", "train", "--config", str(tmp_path / "c.toml"), "--out",
                            str(tmp_path / "run"), "--progress-json"], env=env,
                           on_progress=lambda p: steps.append(p.get("step") or 0)).start()
    start = time.time()
    while max(steps, default=0) < 3:
        assert runner.poll() is None and time.time() - start < 120, runner.lines[-5:]
        time.sleep(0.05)
    runner.cancel(grace_s=60)
    assert runner.wait(timeout=90) == 130 and runner.cancelled
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] >= 3

    from dualnet.training.stop_request import request_stop

    steps.clear()
    cfg.replace(data=[DataSource(str(tmp_path / "a.nrrd"))]).save(tmp_path / "c.toml")
    runner = ProcessRunner([sys.executable, "-m", "dualnet", "train", "--config", str(tmp_path / "c.toml"), "--out",
                            str(tmp_path / "run2"), "--progress-json"], env=env,
                           on_progress=lambda p: steps.append(p.get("step") or 0)).start()
    while max(steps, default=0) < 3:
        assert runner.poll() is None and time.time() - start < 240, runner.lines[-5:]
        time.sleep(0.05)
    runner.cancel(grace_s=60, ask=lambda: request_stop(tmp_path / "run2"))  # the panel's way, on any platform
    assert runner.wait(timeout=90) == 130
    assert load_checkpoint(tmp_path / "run2" / "checkpoint.pt")["step"] >= 3

    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\n"
                        "time.sleep(60)\n", encoding="utf-8")
    runner = ProcessRunner([sys.executable, str(stubborn)]).start()
    while not runner.lines:
        runner.poll()
        time.sleep(0.05)
    began = time.time()
    runner.cancel(grace_s=1.0)
    runner.cancel(grace_s=60.0)  # a second click keeps the first deadline
    assert runner.wait(timeout=20) != 0 and 1.0 <= time.time() - began < 15  # killed after its grace


def test_a_run_resumed_before_its_time_budget_was_fitted_still_fits_it(tmp_path, crop):
    """The budget was fitted only in a run that started at step 0: one cancelled before step 50 and
    resumed kept the full horizon (the cosine at its peak when the hard stop came)."""
    cfg = _config(steps=100000, time_budget_s=600.0, val_every=100000, checkpoint_every=100000)
    out = tmp_path / "run"
    _cancelled_run(out, crop, cfg, at=5)
    token, messages = CancelToken(), []

    def progress(fraction, message):
        messages.append(message)
        if message.startswith("step 70/"):
            token.cancel()

    with pytest.raises(CancelledError):
        pretrain(cfg, data=crop, out_dir=out, resume=True, progress=progress, cancel=token)
    fitted = [m for m in messages if m.startswith("time budget 600 s")]
    assert fitted and "of 100000 steps" in fitted[0]
    assert load_checkpoint(out / "checkpoint.pt")["total_steps"] < 100000


@pytest.mark.parametrize("field, value, says", [
    ("steps", "1000", "steps must be a whole number"), ("lr", "1e-3", "lr must be a finite number"),
    ("time_budget_s", float("inf"), "time_budget_s must be a finite number"), ("val_patches", 0, "val_patches"),
    ("min_lr_ratio", -1.0, "min_lr_ratio"), ("seed", -1, "seed"), ("dropout", 2.0, "dropout"),
    ("val_fraction", 1.0, "val_fraction"), ("slice_axes", 0, "slice_axes must be a list of whole numbers"),
    ("intensity_jitter", 1.0, "intensity_jitter"), ("threads", -2, "threads"), ("lambda_mse", -1.0, "lambda_mse must be >= 0"),
])
def test_config_values_are_checked_with_one_line(field, value, says):
    """These gave a traceback (TypeError, IndexError, OverflowError after 50 steps) or trained wrongly
    (a negative min_lr_ratio: gradient ascent at the end of the cosine)."""
    with pytest.raises(InputError, match=says):
        TrainConfig.from_dict({**_config().to_dict(), field: value})
