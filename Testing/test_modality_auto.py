"""``--modality auto`` (the default): the modality comes from the DICOM tag, else from the real
scan's intensities, is said on stderr and recorded in the info JSON; options that cannot act warn
(--sigma with the network, a model card of another modality) or are refused (--frame on 3D)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_dualnet, visible_lines
from dualnet.io import Volume, read_volume, write_volume
from dualnet.modality import choose_modality, guess_modality, modality_from_intensities

REPO = Path(__file__).resolve().parents[1]


def run(argv, capfd):
    """``dualnet ARGV`` in this process: (exit code, stdout, stderr lines as the terminal shows them)."""
    code, out, err = run_dualnet(argv, capfd)
    return code, out, visible_lines(err)


def lines_starting(lines, prefix):
    return [x for x in lines if x.startswith(prefix)]


@pytest.fixture(scope="module")
def ct_slab(tmp_path_factory, ct_volume) -> Path:
    """8 axial slices of the real abdominal CT (HU, int32, body and the air around it), in-plane every 2nd voxel."""
    arr = ct_volume.array[52:60, ::2, ::2]
    sp = ct_volume.spacing
    vol = Volume(arr, (sp[0] * 2, sp[1] * 2, sp[2]), ct_volume.origin, ct_volume.direction)
    return write_volume(vol, tmp_path_factory.mktemp("ct") / "ct.nrrd")


@pytest.fixture(scope="module")
def mri_small(tmp_path_factory, mri_crop) -> Path:
    return write_volume(Volume(mri_crop[:8, :40, :40].astype(np.int16), (1.0, 1.0, 1.0)),
                        tmp_path_factory.mktemp("mri") / "t1.nrrd")


def tiny_model(folder: Path, modality: str, **arch) -> Path:
    """An untrained tiny 2D DUAL-NET whose card says ``modality`` (``arch``: :func:`build_model`'s options)."""
    torch = pytest.importorskip("torch")
    from dualnet import modelfile
    from dualnet.models import build_model

    torch.manual_seed(0)
    card = {"modality": modality, "normalisation": {"method": "percentile", "p_low": 0.5, "p_high": 99.5}}
    name = f"tiny_{modality}{'_'.join(f'_{k}{v}' for k, v in sorted(arch.items()))}.safetensors"
    return modelfile.save_model(folder / name, build_model("tiny", 2, **arch).eval(), card)


# ----------------------------------------------------------------------------- the choice on real scans
def test_real_ct_in_hu_is_denoised_as_ct(tmp_path, ct_slab, capfd):
    assert read_volume(ct_slab).array.min() <= -1000  # air in HU
    info = tmp_path / "info.json"
    code, out, err = run(["denoise", ct_slab, tmp_path / "o.nrrd", "--method", "median", "--info-json", info], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert (res["modality"], res["modality_source"]) == ("ct", "intensities")
    assert "Hounsfield" in res["modality_reason"]
    said = lines_starting(err, "dualnet: modality")
    assert said == [f"dualnet: modality ct ({res['modality_reason']})"], err
    assert not lines_starting(err, "dualnet: warning"), err
    assert "(median, ct," in out


def test_real_mri_is_denoised_as_mri(tmp_path, mri_small, capfd):
    info = tmp_path / "info.json"
    code, _, err = run(["denoise", mri_small, tmp_path / "o.nrrd", "--method", "median", "--info-json", info,
                        "--modality", "auto"], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert (res["modality"], res["modality_source"]) == ("mri", "intensities")
    assert lines_starting(err, "dualnet: modality mri (")


def test_real_8bit_ultrasound_frame_is_denoised_as_us(tmp_path, us_image, capfd):
    src = write_volume(us_image.with_array(us_image.array[200:296, 200:296]), tmp_path / "us.png")
    info = tmp_path / "info.json"
    code, _, err = run(["denoise", src, tmp_path / "o.nrrd", "--method", "median", "--info-json", info], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert res["modality"] == "us" and "8-bit" in res["modality_reason"]


def test_8bit_3d_mri_is_mri_not_ultrasound(shared_data):
    """Three of the real MRIs are stored as uint8 volumes: only an 8-bit 2D image means ultrasound."""
    vol = read_volume(shared_data / "mri" / "clinical_tbx_t2.nii.gz")
    assert vol.array.dtype == np.uint8
    assert modality_from_intensities(vol.array)[0] == "mri"


@pytest.mark.parametrize("name, padding", [("covid19_ny_sbu_axial/A002304_19001231.nii.gz", -3024),
                                           ("ge_hispeed_head_ct_28sl.nii.gz", -1500)])
def test_ct_with_padding_outside_the_scan_field_is_ct(shared_data, name, padding):
    arr = read_volume(shared_data / "ct" / name).array
    assert arr.min() == padding
    mod, reason = modality_from_intensities(arr)
    assert mod == "ct" and f"{padding} outside the scan field" in reason


def test_dicom_modality_tag_wins(shared_data, capfd):
    """A real MR DICOM series: the Modality tag decides (estimate reads the folder in a second)."""
    code, out, err = run(["estimate", shared_data / "dicom" / "mr_siemens_t1_fl2d_sag"], capfd)
    assert code == 0, err
    res = json.loads(out)
    assert (res["modality"], res["modality_source"]) == ("mri", "dicom")
    assert "DICOM Modality (0008,0060) = MR" in res["modality_reason"]
    ct_like = np.full((4, 8, 8), -1000, np.int16)
    assert choose_modality("auto", ct_like, {"0008|0060": "MR"}).modality == "mri"
    assert guess_modality(ct_like, metadata={"0008|0060": "OT"})[0] == "ct"  # unknown tag: intensities decide


def test_estimate_defaults_to_auto(ct_slab, capfd):
    code, out, err = run(["estimate", ct_slab], capfd)
    assert code == 0, err
    assert json.loads(out)["modality"] == "ct" and lines_starting(err, "dualnet: modality ct (")
    code, out, err = run(["estimate", ct_slab, "-q"], capfd)
    assert code == 0 and json.loads(out)["modality"] == "ct" and not err


# ----------------------------------------------------------------------------- explicit choice, warnings
def test_explicit_modality_is_honoured_and_a_card_of_another_modality_warns(tmp_path, ct_slab, capfd):
    model = tiny_model(tmp_path, "ct")
    ct = read_volume(ct_slab)
    ct_slab = write_volume(ct.with_array(ct.array[:2]), tmp_path / "ct2.nrrd")  # 2 slices: the network is quick
    info = tmp_path / "info.json"
    code, _, err = run(["denoise", ct_slab, tmp_path / "o.nrrd", "--model", model, "--modality", "mri",
                        "--device", "cpu", "--info-json", info, "-q"], capfd)
    assert code == 0, err
    res = json.loads(info.read_text())
    assert (res["modality"], res["modality_source"], res["model_modality"]) == ("mri", "requested", "ct")
    assert "looks like ct" in res["modality_reason"]
    warnings = lines_starting(err, "dualnet: warning:")
    assert len(warnings) == 1 and "trained for ct" in warnings[0] and "as mri" in warnings[0], err
    assert not lines_starting(err, "dualnet: modality"), "--quiet hides the info line, not the warning"
    # the same model on the same CT with the modality left to auto: no warning
    code, _, err = run(["denoise", ct_slab, tmp_path / "o2.nrrd", "--model", model, "--device", "cpu"], capfd)
    assert code == 0 and not lines_starting(err, "dualnet: warning"), err
    assert lines_starting(err, "dualnet: modality ct (")


def test_sigma_steers_the_network_in_every_modality(tmp_path, mri_small, ct_slab, capfd):
    """--sigma is the network's noise level as it is the classical methods' (noise map, SURE guard):
    MRI the Rician sigma; CT the noise std at water (HU), the scan's own fit keeping the shape. No
    warning that it is ignored, except where nothing would use it; a sigma outside the plausible range
    is refused for the network too."""
    model = tiny_model(tmp_path, "mri")
    info = tmp_path / "info.json"
    code, _, err = run(["denoise", mri_small, tmp_path / "o.nrrd", "--model", model, "--device", "cpu",
                        "--sigma", "20", "--info-json", info], capfd)
    assert code == 0 and not lines_starting(err, "dualnet: warning"), err
    res = json.loads(info.read_text())
    assert res["sigma"] == 20.0 and res["sigma_source"] == "given"
    # a model without a noise-map input: the SURE guard takes the given sigma (the input's SURE is sigma^2)
    assert res["inference_guard"]["mse_input"] == pytest.approx(400.0), res["inference_guard"]
    code, _, err = run(["denoise", mri_small, tmp_path / "ng.nrrd", "--model", model, "--sigma", "20", "--no-guard"],
                       capfd)  # nothing would use it: said so
    warnings = lines_starting(err, "dualnet: warning:")
    assert code == 0 and len(warnings) == 1 and "--sigma ignored" in warnings[0], err
    ct_model = tiny_model(tmp_path, "ct", context=3, noise_map=True)  # a noise-map model, as the shipped ones
    outs = {}
    for sigma in (None, "5", "60"):
        out, info = tmp_path / f"c{sigma}.nrrd", tmp_path / f"c{sigma}.json"
        code, _, err = run(["denoise", ct_slab, out, "--model", ct_model, "--device", "cpu", "--info-json", info,
                            "--no-guard"] + (["--sigma", sigma] if sigma else []), capfd)  # (untrained: the guard
        # would give the input back whatever the sigma)
        assert code == 0 and not lines_starting(err, "dualnet: warning"), err
        res = json.loads(info.read_text())
        model_info = res["inference_noise_model"]
        if sigma:
            assert res["sigma"] == float(sigma) and model_info["sigma"] == float(sigma), res
            assert model_info["gain"] * 1000 + model_info["electronic_sigma"] ** 2 == pytest.approx(float(sigma) ** 2)
        else:
            assert model_info["method"] == "poisson-gaussian-fit", res
        outs[sigma] = read_volume(out).array
    assert not np.array_equal(outs["5"], outs["60"])  # the noise map the network sees follows --sigma
    code, _, err = run(["denoise", ct_slab, tmp_path / "huge.nrrd", "--model", ct_model, "--sigma", "1e9"], capfd)
    assert code == 2 and "plausible range" in err[0] and "HU at water" in err[0], err
    assert not (tmp_path / "huge.nrrd").exists()
    code, _, err = run(["denoise", mri_small, tmp_path / "o2.nrrd", "--method", "median", "--sigma", "20"], capfd)
    assert code == 0 and not lines_starting(err, "dualnet: warning"), err


def test_frame_on_a_3d_image_is_refused_like_check_options_refuses(tmp_path, mri_small, capfd):
    """Refused (exit 2, one line, nothing written), as ``api.check_options`` refuses --tta with a classical method."""
    out = tmp_path / "o.nrrd"
    code, stdout, err = run(["denoise", mri_small, out, "--method", "median", "--frame", "0"], capfd)
    assert code == 2 and len(err) == 1 and "--frame applies to 4D images only" in err[0] and "3D" in err[0], err
    assert not out.exists() and not stdout.strip()
    code, _, err = run(["estimate", mri_small, "--frame", "0"], capfd)
    assert code == 2 and "--frame" in err[0]
    arr = read_volume(mri_small).array[:4, :24, :24].astype(np.float32)
    import SimpleITK as sitk

    four_d = tmp_path / "4d.nrrd"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(arr), sitk.GetImageFromArray(arr + 1)]), str(four_d))
    code, _, err = run(["denoise", four_d, out, "--method", "median", "--frame", "1", "-q"], capfd)
    assert code == 0 and read_volume(out).array.shape == (4, 24, 24), err


# ----------------------------------------------------------------------------- API, panel, batch
def test_api_records_the_choice(mri_crop):
    from dualnet.api import denoise_volume

    vol = Volume(mri_crop[:4, :24, :24].astype(np.int16))
    auto = denoise_volume(vol, method="gaussian", modality="auto").info
    assert (auto["modality"], auto["modality_source"]) == ("mri", "intensities") and auto["modality_reason"]
    given = denoise_volume(vol, method="gaussian", modality="MR").info
    assert (given["modality"], given["modality_reason"]) == ("mri", "requested")


def test_panel_guess_is_the_core_implementation():
    import dualnet.modality as core
    from DualNetDenoiseLib import modality as lib

    assert lib.guess_modality is core.guess_modality and lib.modality_from_intensities is core.modality_from_intensities


def test_batch_script_chooses_per_volume(tmp_path, ct_slab, mri_small):
    folder = tmp_path / "in"
    folder.mkdir()
    ct = read_volume(ct_slab)
    write_volume(ct, folder / "ct.nrrd")
    write_volume(read_volume(mri_small), folder / "t1.nrrd")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    script = REPO / "scripts" / "batch_denoise.py"
    res = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "out"), "--method", "median"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(tmp_path / "out" / "summary.csv", newline="", encoding="utf-8") as fh:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(fh)}
    assert rows["ct.nrrd"]["modality"] == "ct" and "Hounsfield" in rows["ct.nrrd"]["note"]
    assert rows["t1.nrrd"]["modality"] == "mri"
    assert "modality ct (" in res.stdout
