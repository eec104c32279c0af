"""Derived training sources: skull-stripped (``[[data]] brain_mask``: the mask from tissue maps) and
coarsened (``[[data]] coarsen``: block-averaged to a larger voxel size) scans, and a source's share of
the samples (``[[data]] weight``), through the real reader, the config, the patch sampler and the
model card's record of them.

Real seams: NIfTI files written and read through SimpleITK, the real TOML config loader, the real
split loader, and the real ADNI T1 with its FSL FAST maps from ``../shared/data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dualnet.degrade import downsample
from dualnet.errors import InputError
from dualnet.training import data as tdata
from dualnet.training.config import TrainConfig
from dualnet.training.skull_strip import brain_mask_from_maps, strip
from dualnet.training.trainer import _data_sources


def _head(shape=(24, 32, 32)):
    """A synthetic head (z, y, x): a bright 'scalp' shell around a brain ball with a ventricle
    (no tissue probability) in its centre, and a stray tissue blob in a corner."""
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    r = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    brain = r < 8
    ventricle = r < 2.5
    gm = (brain & (r >= 6)).astype(np.float32)
    wm = (brain & (r < 6) & ~ventricle).astype(np.float32)
    wm[1:3, 1:3, 1:3] = 1.0  # the stray blob (as the ADNI maps' artificial sphere)
    image = np.where(brain, 100.0, 0.0) + np.where((r >= 10) & (r < 12), 300.0, 0.0) + 5.0
    return image.astype(np.float32), gm, wm, brain


def _write(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))
    return str(path)


def test_mask_fills_the_ventricle_drops_the_stray_blob_and_keeps_a_margin():
    _, gm, wm, brain = _head()
    mask = brain_mask_from_maps([gm, wm], margin=1)
    centre = tuple(n // 2 for n in mask.shape)
    assert mask[centre], "the ventricle (no tissue probability) must be inside the filled mask"
    assert not mask[1:3, 1:3, 1:3].any(), "the stray blob is not the largest component"
    assert mask[brain].all()
    grown = mask & ~brain
    assert grown.any() and grown.sum() < brain.sum(), "the margin grows the brain by a rim only"
    no_margin = brain_mask_from_maps([gm, wm], margin=0)
    assert no_margin.sum() < mask.sum()


def test_mask_rejects_bad_maps():
    _, gm, wm, _ = _head()
    with pytest.raises(InputError, match="one shape"):
        brain_mask_from_maps([gm, wm[:-1]])
    with pytest.raises(InputError, match="no tissue maps"):
        brain_mask_from_maps([])
    with pytest.raises(InputError, match="above"):
        brain_mask_from_maps([np.zeros_like(gm)])
    bad = gm.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        brain_mask_from_maps([bad])


def test_strip_zeroes_outside_exactly_and_keeps_inside():
    image, gm, wm, _ = _head()
    mask = brain_mask_from_maps([gm, wm])
    out = strip(image, mask)
    assert np.all(out[~mask] == 0.0)
    np.testing.assert_array_equal(out[mask], image[mask])
    assert image[~mask].min() > 0, "the input itself is untouched (a copy is returned)"
    with pytest.raises(InputError, match="shape"):
        strip(image[:-1], mask)


def test_read_source_strips_then_crops(tmp_path):
    image, gm, wm, _ = _head()
    img = _write(tmp_path / "head.nii.gz", image, (0.5, 1.0, 1.5))
    maps = [_write(tmp_path / "gm.nii.gz", gm), _write(tmp_path / "wm.nii.gz", wm)]
    [(plain, _, name0)] = tdata.read_source(img)
    [(arr, spacing, name)] = tdata.read_source(img, brain_mask=maps)
    assert name.endswith("(skull-stripped)") and not name0.endswith("(skull-stripped)")
    assert spacing == pytest.approx(tuple(reversed((0.5, 1.0, 1.5))))
    mask = brain_mask_from_maps([gm, wm])
    np.testing.assert_array_equal(arr, np.where(mask, plain, 0.0))
    assert np.all(arr[~mask] == 0.0) and plain[~mask].min() > 0
    [(cropped, _, _)] = tdata.read_source(img, brain_mask=maps, crop=[2, 20, 4, 28, 4, 28])
    np.testing.assert_array_equal(cropped, arr[2:20, 4:28, 4:28])


def test_read_source_rejects_mismatched_missing_or_2d_maps(tmp_path):
    image, gm, wm, _ = _head()
    img = _write(tmp_path / "head.nii.gz", image)
    small = _write(tmp_path / "small.nii.gz", gm[:-2])
    with pytest.raises(InputError, match="shape"):
        tdata.read_source(img, brain_mask=[small, small])
    with pytest.raises(InputError, match="not found"):
        tdata.read_source(img, brain_mask=[str(tmp_path / "missing.nii.gz")])
    flat = _write(tmp_path / "flat.nii.gz", image[12:13])
    with pytest.raises(InputError):
        tdata.read_source(flat, brain_mask=[_write(tmp_path / "gm.nii.gz", gm)])
    frames = tmp_path / "frames"
    frames.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image[12].astype(np.uint8)), str(frames / "0001.png"))
    with pytest.raises(InputError, match="3D scan"):
        tdata.read_source(frames, brain_mask=[str(tmp_path / "gm.nii.gz")])


def test_config_loads_brain_mask_and_the_split_and_card_use_it(tmp_path):
    image, gm, wm, _ = _head()
    _write(tmp_path / "head.nii.gz", image)
    _write(tmp_path / "gm.nii.gz", gm)
    _write(tmp_path / "wm.nii.gz", wm)
    toml = tmp_path / "c.toml"
    toml.write_text('modality = "mri"\n'
                    '[[data]]\npath = "head.nii.gz"\nsplit = "train"\n'
                    '[[data]]\npath = "head.nii.gz"\nsplit = "train"\nbrain_mask = ["gm.nii.gz", "wm.nii.gz"]\n'
                    '[[data]]\npath = "head.nii.gz"\nsplit = "val"\n')
    cfg = TrainConfig.from_toml(toml)
    assert cfg.data[1].brain_mask == ["gm.nii.gz", "wm.nii.gz"] and cfg.data[0].brain_mask is None
    train, val = tdata.load_split(cfg, data_dir=tmp_path)
    assert len(train) == 2 and len(val) == 1
    stripped = [im for im in train if im.name.endswith("(skull-stripped)")]
    assert len(stripped) == 1
    mask = brain_mask_from_maps([gm, wm])
    assert np.all(stripped[0].array[~mask] == 0.0)
    sources = _data_sources(cfg, tmp_path, train + val, in_memory=False)
    assert sources[1]["brain_mask"] == ["gm.nii.gz", "wm.nii.gz"] and "skull_stripped" in sources[1]
    assert "brain_mask" not in sources[0]
    with pytest.raises(InputError, match="brain_mask"):
        TrainConfig.from_dict({"modality": "mri", "data": [{"path": "head.nii.gz", "brain_mask": "gm.nii.gz"}]})
    with pytest.raises(InputError, match="brain_mask"):
        TrainConfig.from_dict({"modality": "mri", "data": [{"path": "head.nii.gz", "brain_mask": []}]})


def test_the_adni_t1_stripped_with_its_fast_maps(shared_data):
    d = shared_data / "mri"
    [(arr, _, _)] = tdata.read_source(d / "adni_mprage_t1.nii.gz",
                                      brain_mask=[d / "adni_mprage_gm_pve.nii.gz", d / "adni_mprage_wm_pve.nii.gz"])
    inside = arr > 0
    assert 0.08 < inside.mean() < 0.2, "a brain is about 1.1-1.6 l of this 11 l field of view"
    assert not inside[:, :20].any() and not inside[:, -20:].any(), "nothing left at the field of view's edges"
    from scipy import ndimage

    labels, n = ndimage.label(inside)
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.max() > 0.99 * inside.sum(), "one connected brain (the stray sphere dropped)"


def test_coarsen_block_averages_after_strip_and_crop(tmp_path):
    image, gm, wm, _ = _head()
    img = _write(tmp_path / "head.nii.gz", image, (0.5, 1.0, 1.5))  # (x, y, z) spacing in the file
    maps = [_write(tmp_path / "gm.nii.gz", gm), _write(tmp_path / "wm.nii.gz", wm)]
    [(plain, sp0, _)] = tdata.read_source(img)
    [(arr, sp, name)] = tdata.read_source(img, coarsen=[1, 2, 3])
    np.testing.assert_allclose(arr, downsample(plain, (1, 2, 3))[0])
    assert arr.shape == (24, 16, 10) and name.endswith("(coarsened 1x2x3)")
    assert sp == pytest.approx((sp0[0], sp0[1] * 2, sp0[2] * 3))
    [(both, _, name2)] = tdata.read_source(img, brain_mask=maps, crop=[2, 20, 4, 28, 4, 28], coarsen=[2, 2, 2])
    [(stripped, _, _)] = tdata.read_source(img, brain_mask=maps)
    np.testing.assert_allclose(both, downsample(stripped[2:20, 4:28, 4:28], (2, 2, 2))[0])
    assert "(skull-stripped)" in name2 and name2.endswith("(coarsened 2x2x2)")
    flat = _write(tmp_path / "slice.png.nii.gz", image[12])
    [(two_d, sp2, _)] = tdata.read_source(flat, coarsen=[5, 2, 2])  # a 2D image takes the (y, x) factors
    assert two_d.shape == (16, 16) and len(sp2) == 2
    with pytest.raises(InputError, match="coarsen"):
        tdata.read_source(flat, coarsen=[2, 2, 2, 2])


@pytest.mark.parametrize("bad", ["2", 2, [0, 1, 1], [1.5, 1, 1], [1, 1, 1, 1], [True, 1, 1]])
def test_config_rejects_bad_coarsen(bad):
    with pytest.raises(InputError, match="coarsen"):
        TrainConfig.from_dict({"modality": "ct", "data": [{"path": "a.nii.gz", "coarsen": bad}]})


def test_config_and_card_record_coarsen(tmp_path):
    image, _, _, _ = _head()
    _write(tmp_path / "head.nii.gz", image)
    toml = tmp_path / "c.toml"
    toml.write_text('modality = "ct"\n[[data]]\npath = "head.nii.gz"\n'
                    '[[data]]\npath = "head.nii.gz"\ncoarsen = [1, 2, 2]\n[[data]]\npath = "head.nii.gz"\nsplit = "val"\n')
    cfg = TrainConfig.from_toml(toml)
    assert cfg.data[1].coarsen == [1, 2, 2]
    train, val = tdata.load_split(cfg, data_dir=tmp_path)
    assert sorted(im.array.shape for im in train) == [(24, 16, 16), (24, 32, 32)]
    sources = _data_sources(cfg, tmp_path, train + val, in_memory=False)
    assert sources[1]["coarsen"] == [1, 2, 2] and "coarsen" not in sources[0]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_config_rejects_bad_weight(bad):
    with pytest.raises(InputError, match="weight"):
        TrainConfig.from_dict({"modality": "ct", "data": [{"path": "a.nii.gz", "weight": bad}]})


def test_weight_scales_a_source_share_of_the_samples_and_the_card_records_it(tmp_path):
    """Sources are drawn by voxel count times ``weight``: a coarsened copy (a quarter of the voxels)
    given weight 4 is drawn as often as the scan it came from."""
    image, _, _, _ = _head()
    _write(tmp_path / "head.nii.gz", image)
    toml = tmp_path / "c.toml"
    toml.write_text('modality = "ct"\ncontext = 1\npatch_size = 8\nmin_foreground = 0.0\n'
                    '[[data]]\npath = "head.nii.gz"\n'
                    '[[data]]\npath = "head.nii.gz"\ncoarsen = [1, 2, 2]\nweight = 4.0\n'
                    '[[data]]\npath = "head.nii.gz"\nsplit = "val"\n')
    cfg = TrainConfig.from_toml(toml)
    assert cfg.data[1].weight == 4.0 and cfg.data[0].weight == 1.0
    train, val = tdata.load_split(cfg, data_dir=tmp_path)
    sampler = tdata.PatchSampler(train, cfg)
    np.testing.assert_allclose(sampler.weights, [0.5, 0.5])
    unweighted = TrainConfig.from_dict({**cfg.to_dict(), "data": [{"path": "head.nii.gz"},
                                                                  {"path": "head.nii.gz", "coarsen": [1, 2, 2]},
                                                                  {"path": "head.nii.gz", "split": "val"}]})
    np.testing.assert_allclose(tdata.PatchSampler(tdata.load_split(unweighted, data_dir=tmp_path)[0],
                                                  unweighted).weights, [0.8, 0.2])
    sources = _data_sources(cfg, tmp_path, train + val, in_memory=False)
    assert sources[1]["weight"] == 4.0 and "weight" not in sources[0]


def test_the_val_fraction_fallback_keeps_a_file_and_its_copies_on_one_side(tmp_path):
    """Without a ``split = "val"`` source, the last entries were held out one by one: with [a, b, b
    coarsened] the coarsened copy of b was validation while b itself trained. Now files count once,
    and every entry of a held-out file is validation."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _write(tmp_path / f"{name}.nii.gz", rng.random((12, 24, 24)).astype(np.float32) * 100 + 50)
    toml = tmp_path / "c.toml"
    toml.write_text('modality = "mri"\nval_fraction = 0.3\n'
                    '[[data]]\npath = "a.nii.gz"\n'
                    '[[data]]\npath = "b.nii.gz"\n'
                    '[[data]]\npath = "b.nii.gz"\ncoarsen = [1, 2, 2]\n')
    train, val = tdata.load_split(TrainConfig.from_toml(toml), data_dir=tmp_path)
    assert [im.name.split("/")[-1] for im in train] == ["a.nii.gz"]
    assert sorted(im.name.split("/")[-1] for im in val) == ["b.nii.gz", "b.nii.gz (coarsened 1x2x2)"]
