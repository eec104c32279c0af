"""The view loss: 2.5D training on cubes, scored on the mean of the three views inference averages.

Real seams only: the real patch sampler and degradation on the real T1 crop, the real loss, the real
trainer on a tiny preset for a few steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualnet.errors import InputError
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig
from dualnet.training.losses import ABSOLUTE_WEIGHT_MSE, view_mean_loss, weighted_mse

P = 8  # cube edge (LR voxels): 3 x 8 slices of 8 x 8 per cube


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=16, batch_size=3, steps=3, lr=1e-3,
                warmup_steps=1, val_every=3, checkpoint_every=3, log_every=1, val_patches=2,
                elastic_prob=0.0, device="cpu", seed=3, threads=1, lr_factor=2, min_foreground=0.1,
                context=5, noise_map=True, noise_map_jitter=0.0, slice_axes=[0, 1, 2], lambda_mse=1.0,
                lambda_l1=0.0, lambda_ssim=0.0, lambda_edge=0.0, dropout_mode="channel",
                mse_weighting="rmse", view_loss=1.0, cube_size=P)
    base.update(kw)
    return TrainConfig(**base).validate()


def _views(a: np.ndarray) -> list:
    """The three views of a (3 P, ...) per-slice array, each put back in (z, y, x) order."""
    z, y, x = a[:P], a[P:2 * P], a[2 * P:3 * P]
    return [z, np.transpose(y, (1, 0, 2)), np.transpose(x, (1, 2, 0))]


def test_cube_slices_are_the_three_views_of_one_cube(mri_crop):
    img = tdata.make_image(mri_crop, (1.0, 1.0, 1.0), "crop", "mri")
    b = tdata.PatchSampler([img], _cfg()).batch(4)
    assert b["noisy"].shape == b["clean"].shape == b["std"].shape == b["nmap"].shape == (3 * P, 1, P, P)
    assert b["context"].shape == (3 * P, 5, P, P) and b["cube_clean"].shape == (1, 1, P, P, P)
    assert np.unique(b["level"]).size == 1  # one noise level (one noisy cube) for all its slices
    noisy, clean = b["noisy"][:, 0], b["clean"][:, 0]
    # every view cuts the same noisy cube, and the clean slices rebuild the clean cube
    vz, vy, vx = _views(noisy)
    assert np.array_equal(vz, vy) and np.array_equal(vz, vx)
    for v in _views(clean):
        assert np.array_equal(v, b["cube_clean"][0, 0])
    # the middle context slice is the slice itself; its neighbours are the next slices of the cube,
    # and the first and last slices read theirs from the margin around it (no repeated slices)
    assert np.array_equal(b["context"][:, 2], noisy)
    for view in range(3):
        s = slice(view * P, (view + 1) * P - 1)
        assert np.array_equal(b["context"][s, 3], noisy[view * P + 1:(view + 1) * P])
    assert not np.array_equal(b["context"][0, 1], b["context"][0, 2])
    assert b["clean"].std() > 0.01 and not np.allclose(noisy, clean)


def test_cube_batches_are_deterministic_and_stack_cubes(mri_crop):
    img = tdata.make_image(mri_crop, (1.0, 1.0, 1.0), "crop", "mri")
    s = tdata.PatchSampler([img], _cfg(cubes_per_step=2))
    a, b, c = s.batch(7), s.batch(7), s.batch(8)
    assert a["noisy"].shape == (6 * P, 1, P, P) and a["cube_clean"].shape == (2, 1, P, P, P)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["noisy"], c["noisy"])
    # the second cube's slices follow the first's
    for v in _views(a["clean"][3 * P:, 0]):
        assert np.array_equal(v, a["cube_clean"][1, 0])


def test_view_every_mixes_cube_steps_with_ordinary_batches(mri_crop):
    img = tdata.make_image(mri_crop, (1.0, 1.0, 1.0), "crop", "mri")
    s = tdata.PatchSampler([img], _cfg(view_every=3))
    kinds = ["cube_clean" in s.batch(step) for step in range(7)]
    assert kinds == [True, False, False, True, False, False, True]
    plain = s.batch(4)
    assert plain["noisy"].shape == (3, 1, 16, 16)  # batch_size slices of patch_size
    assert [s.is_cube_step(k) for k in range(7)] == kinds
    # with the view loss off, or in self-supervised sampling, no step is a cube step
    assert not tdata.PatchSampler([img], _cfg(view_loss=0.0, view_every=3)).is_cube_step(0)


def test_view_mean_loss_scores_the_mean_of_the_views():
    g = torch.Generator().manual_seed(0)
    cube = torch.rand(1, 1, P, P, P, generator=g)
    c = cube[0, 0].numpy()
    views = [c + 0.1 * np.random.default_rng(i).standard_normal(c.shape).astype(np.float32) for i in range(3)]
    slices = np.concatenate([views[0], np.transpose(views[1], (1, 0, 2)), np.transpose(views[2], (2, 0, 1))])
    pred = torch.from_numpy(slices[:, None])
    mse_of_mean = float(np.mean((np.mean(views, axis=0) - c) ** 2))
    assert float(view_mean_loss(pred, cube)) == pytest.approx(mse_of_mean, rel=1e-5)
    # each view alone is worse than their mean: the loss is not a per-slice MSE in disguise
    assert mse_of_mean < 0.5 * float(np.mean((views[0] - c) ** 2))
    # weights are absolute for one-level cubes: ((MSE + eps) / reference)^-1/2, not normalised to 1
    rmse = float(view_mean_loss(pred, cube, "rmse"))
    assert rmse == pytest.approx(mse_of_mean * ((mse_of_mean + 1e-6) / ABSOLUTE_WEIGHT_MSE) ** -0.5, rel=1e-4)
    x, y = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.1)
    assert float(weighted_mse(x, y, "rmse")) == pytest.approx(0.01, rel=1e-6)  # normalised: plain MSE here


def test_view_loss_config_checks():
    with pytest.raises(InputError, match="view_loss needs"):
        _cfg(slice_axes=[0])
    with pytest.raises(InputError, match="view_loss needs"):
        _cfg(dim=3, context=1, noise_map=False)
    with pytest.raises(InputError, match="cube_size"):
        _cfg(cube_size=4)
    with pytest.raises(InputError, match="cubes_per_step"):
        _cfg(cubes_per_step=0)
    with pytest.raises(InputError, match="view_every"):
        _cfg(view_every=0)
    with pytest.raises(InputError, match="view_loss must be"):
        _cfg(view_loss=-1.0)


def test_cubes_need_a_near_isotropic_volume(mri_crop):
    thick = tdata.make_image(mri_crop, (4.8, 1.0, 1.0), "thick", "mri")
    s = tdata.PatchSampler([thick], _cfg(slice_max_anisotropy=1.5))
    with pytest.raises(InputError, match="near-isotropic"):
        s.batch(0)


def test_training_with_the_view_loss(mri_crop, tmp_path):
    from dualnet import modelfile
    from dualnet.training.trainer import pretrain

    res = pretrain(_cfg(view_every=2), data=[(mri_crop, (1.0, 1.0, 1.0))], out_dir=tmp_path / "run")
    log = (tmp_path / "run" / "train_log.csv").read_text()
    assert "views" in log.splitlines()[0]  # the term is logged
    net, card = modelfile.load_model(res.model_path, "cpu")
    assert card["config"]["view_loss"] == 1.0 and card["config"]["cube_size"] == P
    assert card["config"]["view_every"] == 2  # batches 0 and 2 cubes, batch 1 ordinary slices
    assert np.isfinite(res.last_loss) and res.steps == 3
