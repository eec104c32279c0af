"""Slicer CLI modules run as Slicer runs them: a subprocess with the argument list built from XML.

Slicer puts flagged parameters first (a true ``<boolean>`` as a bare ``--flag``, a false one
omitted) and the ``<index>``-ed images last, and reads ``<filter-progress>`` lines from stdout.
The scripts parse their own XML (``DualNetDenoiseLib.cliargs``), so parser and XML cannot drift;
these tests check that on the real XML files, then run each CLI on small crops of the real
scans written to ``tmp_path`` and check outputs, geometry and progress lines.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DualNetDenoise"))

from DualNetDenoiseLib import cliargs  # noqa: E402

CLIS = {
    "DualNetDenoiseCLI": "Filtering.Denoising",
    "BM4DDenoiseCLI": "Filtering.Denoising",
    "DiceAssessmentCLI": "Quantification",
}


def xml_path(name: str) -> Path:
    return REPO / name / f"{name}.xml"


def run_cli(name: str, args, timeout=50):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # 2 shared cores: no thread oversubscription
    env.pop("PYTHONPATH", None)  # the script must find the core by itself
    return subprocess.run([sys.executable, str(REPO / name / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(tmp_cwd()))


def tmp_cwd() -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp"))


def progress_values(stdout: str):
    return [float(line.split(">")[1].split("<")[0]) for line in stdout.splitlines()
            if line.startswith("<filter-progress>")]


def assert_filter_protocol(stdout: str):
    lines = stdout.splitlines()
    starts = [i for i, l in enumerate(lines) if l.startswith("<filter-start>")]
    ends = [i for i, l in enumerate(lines) if l.startswith("<filter-end>")]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], stdout[-2000:]
    values = progress_values(stdout)
    assert values and all(0.0 <= v <= 1.0 for v in values) and values[-1] == 1.0
    assert values == sorted(values), "progress must not go backwards"


def write(vol_array, path, spacing=(0.9, 1.1, 2.5), origin=(-40.0, 12.5, 7.0)):
    from dualnet.io import Volume, write_volume

    a, b = 0.3, 0.2  # oblique direction (row-major, ITK)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    write_volume(Volume(vol_array, spacing, origin, tuple((rz @ rx).ravel())), path)
    return path


def assert_same_geometry(a_path, b_path):
    from dualnet.io import read_volume

    a, b = read_volume(a_path), read_volume(b_path)
    assert a.array.shape == b.array.shape
    assert np.allclose(a.spacing, b.spacing, atol=1e-6) and np.allclose(a.origin, b.origin, atol=1e-5)
    assert np.allclose(a.direction, b.direction, atol=1e-6)
    return a, b


# ----------------------------------------------------------------------------- XML and parser
@pytest.mark.parametrize("name", CLIS)
def test_xml_is_valid_and_parser_is_built_from_it(name):
    root = ET.parse(xml_path(name)).getroot()
    assert root.tag == "executable" and root.findtext("category") == CLIS[name]
    for tag in ("title", "description", "version", "contributor"):
        assert (root.findtext(tag) or "").strip(), f"<{tag}> missing"
    spec = cliargs.load_spec(xml_path(name))  # raises on bad defaults / flags / indices
    images = [p for p in spec.params if p.kind == "image"]
    assert any(p.channel == "input" and p.index == 0 for p in images)
    for p in spec.params:
        if p.kind == "boolean":
            assert p.default is False  # Slicer omits false booleans
    parser = cliargs.build_parser(spec)
    dests = {a.dest for a in parser._actions} - {"help", "returnparameterfile"}
    assert dests == {p.name for p in spec.params if p.index is not None or p.option}
    src = (REPO / name / f"{name}.py").read_text(encoding="utf-8")
    assert "parse_cli_args(XML" in src and 'os.path.splitext(os.path.abspath(__file__))[0] + ".xml"' in src


def test_boolean_flags_bare_and_with_values():
    x = xml_path("DualNetDenoiseCLI")
    assert cliargs.parse_cli_args(x, ["--noGuard", "in.nrrd", "out.nrrd"]).noGuard is True
    ns = cliargs.parse_cli_args(x, ["--noGuard", "true", "in.nrrd", "out.nrrd"])
    assert ns.noGuard is True and ns.inputVolume == "in.nrrd" and ns.outputVolume == "out.nrrd"
    assert cliargs.parse_cli_args(x, ["--noGuard", "false", "in.nrrd", "out.nrrd"]).noGuard is False
    assert cliargs.parse_cli_args(x, ["--noGuard=False", "in.nrrd", "out.nrrd"]).noGuard is False
    assert cliargs.parse_cli_args(x, ["in.nrrd", "out.nrrd"]).noGuard is False
    ns = cliargs.parse_cli_args(x, ["in.nrrd", "out.nrrd", "--noGuard"])
    assert ns.noGuard is True and ns.modality == "auto" and ns.device == "auto" and ns.tta == "auto"
    assert cliargs.parse_cli_args(x, ["--tta", "x4", "in.nrrd", "out.nrrd"]).tta == "x4"
    with pytest.raises(SystemExit):
        cliargs.parse_cli_args(x, ["--tta", "x3", "in.nrrd", "out.nrrd"])
    with pytest.raises(SystemExit):
        cliargs.parse_cli_args(x, ["--modality", "pet", "in.nrrd", "out.nrrd"])
    with pytest.raises(SystemExit):
        cliargs.parse_cli_args(xml_path("BM4DDenoiseCLI"), ["--sigma", "-1", "in.nrrd", "out.nrrd"])
    with pytest.raises(SystemExit):
        cliargs.parse_cli_args(x, ["in.nrrd"])


def test_slicer_command_line_order():
    args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
        "inputVolume": "/t/in.nrrd", "outputVolume": "/t/out.nrrd", "modality": "ct", "noGuard": True, "device": "cpu"})
    assert args == ["--modality", "ct", "--device", "cpu", "--noGuard", "/t/in.nrrd", "/t/out.nrrd"]
    assert "--noGuard" not in cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"),
                                                          {"inputVolume": "a", "outputVolume": "b", "noGuard": False})
    dice = cliargs.slicer_command_line(xml_path("DiceAssessmentCLI"), {"labelA": "a", "labelB": "b"}, "/t/ret.txt")
    assert dice[:2] == ["--returnparameterfile", "/t/ret.txt"] and dice[-2:] == ["a", "b"]


def test_spec_rejects_bad_xml(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<executable><parameters><boolean><name>x</name><longflag>x</longflag>"
                   "<default>true</default></boolean></parameters></executable>", encoding="utf-8")
    with pytest.raises(ValueError, match="defaults to true"):
        cliargs.load_spec(bad)
    bad.write_text("<executable><parameters><integer><name>n</name><default>1</default></integer>"
                   "</parameters></executable>", encoding="utf-8")
    with pytest.raises(ValueError, match="neither"):
        cliargs.load_spec(bad)


def test_xml_flag_prints_description():
    res = run_cli("DiceAssessmentCLI", ["--xml"])
    assert res.returncode == 0 and res.stdout == xml_path("DiceAssessmentCLI").read_text(encoding="utf-8")



#: Runs a script with every sys.path entry that holds ``dualnet`` removed (e.g. an editable
#: ``pip install -e .`` of this checkout), so the script has to find the core by itself.
WITHOUT_INSTALLED_CORE = (
    "import os, runpy, sys; "
    "sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'dualnet'))]; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.parametrize("layout", ["single-config", "multi-config"])
@pytest.mark.parametrize("name", list(CLIS))
def test_cli_finds_the_core_in_installed_and_build_tree_layouts(tmp_path, name, layout):
    """Issue 10, defect 7: Slicer puts scripted modules in ``lib/Slicer-X.Y/qt-scripted-modules/`` and
    CLIs in ``lib/Slicer-X.Y/cli-modules/`` - or ``cli-modules/<CONFIG>/`` in a multi-configuration
    build tree (Visual Studio, Xcode), where ``../qt-scripted-modules`` does not resolve. The layout is
    rebuilt in ``tmp_path`` (the core and the Lib linked in, no source checkout beside it)."""
    lib = tmp_path / "lib" / "Slicer-5.8"
    scripted = lib / "qt-scripted-modules"
    scripted.mkdir(parents=True)
    for package in ("dualnet", "DualNetDenoiseLib"):
        (scripted / package).symlink_to(REPO / "DualNetDenoise" / package, target_is_directory=True)
    cli_dir = lib / "cli-modules" / ("Release" if layout == "multi-config" else "")
    cli_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".py", ".xml"):
        (cli_dir / f"{name}{suffix}").write_bytes((REPO / name / f"{name}{suffix}").read_bytes())
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", WITHOUT_INSTALLED_CORE, str(cli_dir / f"{name}.py"), "--xml"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == xml_path(name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- running the CLIs
@pytest.fixture(scope="module")
def clean_crop(mri_crop):
    return mri_crop[:6, 16:40, 16:40].astype(np.float32)


@pytest.fixture(scope="module")
def noisy_crop(clean_crop):
    rng = np.random.default_rng(3)
    return np.clip(clean_crop + rng.normal(0, 50.0, clean_crop.shape), 0, None).astype(np.float32)


def test_bm4d_cli(tmp_path, noisy_crop, clean_crop):
    pytest.importorskip("bm4d", reason="bm4d (optional, non-commercial) not installed")
    src = write(noisy_crop, tmp_path / "in.nrrd")
    out = tmp_path / "out.nii.gz"
    args = cliargs.slicer_command_line(xml_path("BM4DDenoiseCLI"),
                                       {"inputVolume": src, "outputVolume": out, "modality": "mri", "sigma": 50.0})
    res = run_cli("BM4DDenoiseCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_filter_protocol(res.stdout)
    a, b = assert_same_geometry(src, out)
    rmse = lambda x: float(np.sqrt(np.mean((x - clean_crop) ** 2)))
    assert rmse(b.array) < 0.8 * rmse(a.array)  # closer to the clean crop than the noisy input


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained tiny 2D DUAL-NET saved with the core (weights + card): exercises the file path."""
    torch = pytest.importorskip("torch")
    from dualnet import modelfile
    from dualnet.models import build_model

    torch.manual_seed(0)
    return modelfile.save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", build_model("tiny", dim=2),
                                {"modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5,
                                                                      "p_high": 99.5}})


def test_denoise_cli_with_model_and_tta_reaches_the_core(tmp_path, noisy_crop, tiny_model):
    """--tta x8 and --tta off give different results (the untrained model is not rotation-invariant);
    x8 is the core's own x8 result."""
    from dualnet.inference import denoise_array
    from dualnet.modelfile import load_model

    src = write(noisy_crop[:2], tmp_path / "in.nrrd")
    outs = {}
    for tta in ("x8", "off"):
        out = tmp_path / f"out_{tta}.nrrd"
        args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
            "inputVolume": src, "outputVolume": out, "model": tiny_model, "device": "cpu", "tta": tta,
            "modality": "mri", "noGuard": True})
        assert args[args.index("--tta") + 1] == tta
        res = run_cli("DualNetDenoiseCLI", args)
        assert res.returncode == 0, res.stderr[-2000:]
        assert_filter_protocol(res.stdout)
        _, outs[tta] = assert_same_geometry(src, out)
        assert np.isfinite(outs[tta].array).all() and outs[tta].array.dtype == np.float32
    assert not np.allclose(outs["x8"].array, outs["off"].array)
    net, card = load_model(tiny_model, "cpu")
    core = denoise_array(noisy_crop[:2].astype(np.float32), net, card, device="cpu", tta=8, modality="mri", guard=False)
    np.testing.assert_allclose(outs["x8"].array, core.denoised, rtol=1e-4, atol=1e-4 * float(np.abs(core.denoised).max()))


def test_bm4d_cli_chooses_the_modality_and_the_network_cli_prints_warnings(tmp_path, shared_data, tiny_model):
    """The BM4D module defaulted to MRI, whose Rician transform set a CT's air and fat to 0 HU with no
    word; the network module never printed the core's warnings (a model trained for another modality)."""
    pytest.importorskip("bm4d", reason="bm4d (optional, non-commercial) not installed")
    from dualnet.io import read_volume

    ct = read_volume(shared_data / "ct" / "totalseg_abdomen_ct.nii.gz").array[50:58, 35:67, 0:32]  # body and air
    src = write(ct.astype(np.float32), tmp_path / "ct.nrrd")
    out = tmp_path / "bm4d.nrrd"
    args = cliargs.slicer_command_line(xml_path("BM4DDenoiseCLI"), {"inputVolume": src, "outputVolume": out})
    assert cliargs.parse_cli_args(xml_path("BM4DDenoiseCLI"), args).modality == "auto"
    res = run_cli("BM4DDenoiseCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "modality ct" in res.stdout
    air = ct < -900
    assert air.any() and np.median(read_volume(out).array[air]) < -900  # not clipped to 0 by a Rician VST
    out = tmp_path / "net.nrrd"
    args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
        "inputVolume": src, "outputVolume": out, "model": tiny_model, "device": "cpu", "modality": "ct",
        "tta": "off", "noGuard": True})
    res = run_cli("DualNetDenoiseCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: model trained for mri, applied to ct" in res.stdout


def test_denoise_cli_no_guard_flag_reaches_the_core(tmp_path, noisy_crop, tiny_model):
    """The untrained model is far worse than its input: guarded (default) the result is pulled back
    towards the input; with --noGuard it is the network's own output."""
    src = write(noisy_crop, tmp_path / "in.nrrd")
    outs = {}
    for no_guard in (False, True):
        out = tmp_path / f"out_{no_guard}.nrrd"
        args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
            "inputVolume": src, "outputVolume": out, "model": tiny_model, "device": "cpu", "modality": "mri",
            "noGuard": no_guard})
        assert ("--noGuard" in args) is no_guard
        res = run_cli("DualNetDenoiseCLI", args)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[no_guard] = assert_same_geometry(src, out)[1].array
    err = {k: float(np.mean((v - noisy_crop) ** 2)) for k, v in outs.items()}
    assert err[False] < 0.5 * err[True], err


def denoised_by_cli(src: Path, out: Path, model: Path, **params) -> np.ndarray:
    """DualNetDenoiseCLI on ``src`` as MRI with no SURE guard (``params``: more XML parameters), its
    result checked to lie on the input's grid."""
    args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
        "inputVolume": src, "outputVolume": out, "model": model, "device": "cpu", "modality": "mri",
        "noGuard": True, **params})
    res = run_cli("DualNetDenoiseCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    return assert_same_geometry(src, out)[1].array


def test_denoise_cli_views_flag_reaches_the_core(tmp_path, noisy_crop, tiny_model):
    """--views 3 runs the network along z, y and x (the untrained model's three views differ, so
    their mean differs from the axial view); the tiny model's card has no training axes, so auto
    is one view."""
    src = write(noisy_crop[:20, :24, :28], tmp_path / "in.nrrd")
    outs = {views: denoised_by_cli(src, tmp_path / f"out_{views}.nrrd", tiny_model, views=views)
            for views in ("auto", "1", "3")}
    np.testing.assert_array_equal(outs["auto"], outs["1"])
    assert float(np.abs(outs["3"] - outs["1"]).max()) > 1e-3


def test_denoise_cli_uncertainty_output(tmp_path, noisy_crop, tiny_model):
    src = write(noisy_crop[:2], tmp_path / "in.nrrd")
    out, unc = tmp_path / "out.nrrd", tmp_path / "unc.nrrd"
    args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
        "inputVolume": src, "outputVolume": out, "uncertaintyVolume": unc, "model": tiny_model, "device": "cpu"})
    res = run_cli("DualNetDenoiseCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_geometry(src, out)
    _, u = assert_same_geometry(src, unc)
    assert (u.array >= 0).all() and u.array.std() > 0  # dropout passes differ


def test_denoise_cli_noise_branch_outputs(tmp_path, noisy_crop, tiny_model):
    """--noiseMapVolume / --confidenceVolume: the NEB's maps on the input's grid; one of them equal
    to the output volume is refused before anything is written."""
    src = write(noisy_crop[:2], tmp_path / "in.nrrd")
    out, nmap, conf = tmp_path / "out.nrrd", tmp_path / "sigma.nrrd", tmp_path / "alpha.nrrd"
    args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
        "inputVolume": src, "outputVolume": out, "noiseMapVolume": nmap, "confidenceVolume": conf,
        "model": tiny_model, "device": "cpu", "modality": "mri"})
    res = run_cli("DualNetDenoiseCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    _, s = assert_same_geometry(src, nmap)
    _, a = assert_same_geometry(src, conf)
    assert (s.array > 0).all() and ((a.array >= 0) & (a.array <= 1)).all()
    clash = tmp_path / "clash.nrrd"
    args = cliargs.slicer_command_line(xml_path("DualNetDenoiseCLI"), {
        "inputVolume": src, "outputVolume": clash, "confidenceVolume": clash, "model": tiny_model, "device": "cpu",
        "modality": "mri"})
    res = run_cli("DualNetDenoiseCLI", args)
    assert res.returncode != 0 and "clash.nrrd" in res.stderr and not clash.exists()


def test_denoise_cli_sigma_is_the_network_noise_level(tmp_path, noisy_crop):
    """--sigma (0 = estimated) reaches the network as `dualnet denoise --sigma` does: a noise-map model
    given two levels gives two results; a negative one is refused by the XML's constraints."""
    torch = pytest.importorskip("torch")
    from dualnet import modelfile
    from dualnet.models import build_model

    torch.manual_seed(0)
    model = modelfile.save_model(tmp_path / "nm.safetensors", build_model("tiny", 2, context=3, noise_map=True),
                                 {"modality": "mri", "normalisation": {"method": "percentile", "p_low": 0.5,
                                                                       "p_high": 99.5}})
    src = write(noisy_crop[:3], tmp_path / "in.nrrd")
    outs = {sigma: denoised_by_cli(src, tmp_path / f"out{sigma:g}.nrrd", model, sigma=sigma)
            for sigma in (0.0, 20.0, 200.0)}
    assert float(np.abs(outs[20.0] - outs[200.0]).max()) > 1e-3
    assert float(np.abs(outs[0.0] - outs[20.0]).max()) > 1e-3  # 0: the estimated sigma, not 20
    with pytest.raises(SystemExit):
        cliargs.parse_cli_args(xml_path("DualNetDenoiseCLI"), ["--sigma", "-1", "in.nrrd", "out.nrrd"])


def test_single_oblique_slice_keeps_geometry(tmp_path, noisy_crop):
    """What every CLI does with a one-slice oblique input: read it, write a result on its grid."""
    from dualnet.io import read_volume, write_volume

    src = write(noisy_crop[:1], tmp_path / "in.nrrd")
    write_volume(read_volume(src), tmp_path / "out.nrrd")
    assert_same_geometry(src, tmp_path / "out.nrrd")


def test_bm4d_thin_volume_works_or_fails_cleanly(noisy_crop):
    pytest.importorskip("bm4d", reason="bm4d (optional, non-commercial) not installed")
    from dualnet import api
    from dualnet.errors import DualNetError
    from dualnet.io import Volume

    try:
        api.denoise_volume(Volume(noisy_crop[:3]), method="bm4d", sigma=50.0)
    except DualNetError:
        pass  # a one-line user error is fine


def test_denoise_cli_reports_errors_in_one_line(tmp_path, noisy_crop):
    src = write(noisy_crop, tmp_path / "in.nrrd")
    res = run_cli("DualNetDenoiseCLI", ["--model", str(tmp_path / "missing.safetensors"), str(src),
                                        str(tmp_path / "o.nrrd")])
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "missing.safetensors" in res.stderr
    assert not (tmp_path / "o.nrrd").exists()
    before = src.read_bytes()
    for name in ("DualNetDenoiseCLI", "BM4DDenoiseCLI"):  # the input node chosen as the output: Slicer's terms
        res = run_cli(name, [str(src), str(src)])
        assert res.returncode == 1 and "choose another or a new output volume node" in res.stderr, res.stderr
    assert src.read_bytes() == before


def test_dice_cli(tmp_path, shared_data):
    from dualnet.io import read_volume

    labels = read_volume(shared_data / "mri" / "voxelmorph_brain_labels.nii.gz").array
    zc, yc, xc = (s // 2 for s in labels.shape)
    a = labels[zc - 4: zc + 4, yc - 24: yc + 24, xc - 24: xc + 24].astype(np.int16)
    b = np.roll(a, 1, axis=2)
    pa, pb = write(a, tmp_path / "a.nrrd"), write(b, tmp_path / "b.nrrd")
    table, ret = tmp_path / "dice.csv", tmp_path / "ret.txt"
    args = cliargs.slicer_command_line(xml_path("DiceAssessmentCLI"),
                                       {"labelA": pa, "labelB": pb, "outputTable": table}, str(ret))
    res = run_cli("DiceAssessmentCLI", args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_filter_protocol(res.stdout)
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    present = sorted(int(v) for v in (set(np.unique(a)) | set(np.unique(b))) - {0})
    assert [int(r["label"]) for r in rows] == present and len(present) >= 3
    for r in rows:
        lab = int(r["label"])
        x, y = a == lab, b == lab
        assert float(r["dice"]) == pytest.approx(2 * (x & y).sum() / (x.sum() + y.sum()), abs=1e-6)
        assert int(r["voxels_a"]) == x.sum() and int(r["voxels_b"]) == y.sum()
    mean = float(ret.read_text(encoding="utf-8").split("=")[1])
    assert mean == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-5)
    # labels subset, and a geometry mismatch is refused
    res = run_cli("DiceAssessmentCLI", ["--labels", str(present[0]), "--outputTable", str(table), str(pa), str(pb)])
    assert res.returncode == 0 and len(list(csv.DictReader(table.open(encoding="utf-8")))) == 1
    write(b, tmp_path / "b_shift.nrrd", origin=(0.0, 0.0, 0.0))
    res = run_cli("DiceAssessmentCLI", [str(pa), str(tmp_path / "b_shift.nrrd")])
    assert res.returncode == 1 and "origin" in res.stderr.lower()
