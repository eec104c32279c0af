"""Which weights a training run exports (dualnet.training): the validation set's levels and
background, the pooled whole-image PSNR score, and a continuation that only gets worse.

Real parts: the real T1 scan of ../shared/data, the real noise models and the real trainer;
nothing is mocked.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from dualnet import modelfile
from dualnet.errors import InputError
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig
from dualnet.training.trainer import pooled_psnr, pretrain


def _cfg(**kw) -> TrainConfig:
    base = dict(modality="mri", preset="tiny", dim=2, patch_size=24, batch_size=4, steps=30, lr=2e-3,
                warmup_steps=3, val_every=3, checkpoint_every=15, log_every=3, val_patches=8, num_workers=0,
                elastic_prob=0.0, device="cpu", seed=5, threads=2, lr_factor=1, min_foreground=0.1)
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture(scope="module")
def head_slab(mri_volume) -> np.ndarray:
    """40 whole axial slices (z, y, x) of the real T1: head and the air around it."""
    arr = mri_volume.array
    zc = arr.shape[0] // 2
    return arr[zc - 20:zc + 20].astype(np.float32)


def test_validation_levels_are_cycled_and_background_patches_can_be_asked_for(head_slab):
    img = [tdata.make_image(head_slab, (1, 1, 1), "t1", "mri")]

    def foreground(cfg: TrainConfig, **kw) -> tuple:
        s = tdata.PatchSampler(img, cfg, **kw).fixed_set(cfg.val_patches)
        return float(np.mean(s["clean"] > tdata.FOREGROUND_THRESHOLD)), s["level"]

    cfg = _cfg(val_patches=24, val_levels=[0.02, 0.05, 0.1], min_foreground=0.6)
    fg_train_rule, levels = foreground(cfg)
    assert levels.tolist() == pytest.approx([0.02, 0.05, 0.1] * 8)
    fg_anywhere, levels0 = foreground(cfg, min_foreground=0.0)
    assert levels0.tolist() == levels.tolist()
    assert fg_train_rule > 0.6 and fg_anywhere < fg_train_rule - 0.15, (fg_train_rule, fg_anywhere)
    spread = tdata.PatchSampler(img, _cfg(val_patches=5, levels=[0.01, 0.1], level_sampling="loguniform")).fixed_set(5)
    assert spread["level"].tolist() == pytest.approx(np.geomspace(0.01, 0.1, 5).tolist(), rel=1e-6)
    for bad in (dict(val_levels=[0.0]), dict(val_min_foreground=1.5), dict(select_on="mse")):
        with pytest.raises(InputError):
            _cfg(**bad)


def test_pooled_psnr_is_the_psnr_of_the_pooled_error_per_level():
    # level 0.05: two patches, errors 1e-4 and 9e-4 on 100 voxels each -> pooled MSE 5e-4 (33.01 dB),
    # not the mean of their PSNRs (35.23 dB); level 0.1: one patch at MSE 1e-3 (30 dB)
    sq = {0.05: [1e-4 * 100 + 9e-4 * 100, 200], 0.1: [1e-3 * 50, 50]}
    assert pooled_psnr(sq) == pytest.approx(0.5 * (-10 * math.log10(5e-4) + 30.0), abs=1e-9)


def test_a_continuation_that_only_gets_worse_exports_its_starting_weights(tmp_path, head_slab):
    crop = head_slab[:, 64:192, 64:192]
    base = pretrain(_cfg(steps=4), data=[crop], out_dir=tmp_path / "a")
    # a learning rate far too high wrecks every update: the starting weights score best
    cfg = dict(steps=6, lr=0.05, warmup_steps=1, init_from=str(base.model_path),
               select_on="psnr_pooled", val_min_foreground=0.0, val_levels=[0.03, 0.08])
    res = pretrain(_cfg(**cfg), data=[crop], out_dir=tmp_path / "b")
    assert res.best_step == 0
    m0, _ = modelfile.load_model(base.model_path, "cpu")
    m1, card = modelfile.load_model(res.model_path, "cpu")
    for (k, v0), v1 in zip(m0.state_dict().items(), m1.state_dict().values()):
        assert torch.equal(v0, v1), k
    assert card["training"]["exported_step"] == 0 and card["training"]["steps"] == 6
    assert card["validation"]["selected_on"] == "psnr_pooled"
    assert "at least 0 foreground" in card["validation"]["set"] and "[0.03, 0.08]" in card["validation"]["set"]
    assert np.isfinite(card["metrics"]["val_psnr_pooled_db"])
    # it did get worse, and the log says so: every later validation below the start's
    with open(res.log_path, newline="") as f:
        pooled = [(int(r["step"]), float(r["val_psnr_pooled"])) for r in csv.DictReader(f) if r.get("val_psnr_pooled")]
    assert pooled[0][0] == 0 and len(pooled) >= 3
    assert all(v < pooled[0][1] for _, v in pooled[1:]), pooled
