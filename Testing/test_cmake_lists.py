"""The CMake files of the extension list every file Slicer must install.

Slicer installs only what a module's CMakeLists.txt lists (explicit lists, Slicer convention).
A .py file or resource that exists under a module folder but is missing from its list would be
absent from the installed extension (the core ships inside ``DualNetDenoise/``), so these tests
fail on any such file, and on listed files that do not exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTED_MODULES = ["DualNetDenoise", "DualNetTraining"]
CLI_MODULES = ["DualNetDenoiseCLI", "BM4DDenoiseCLI", "DiceAssessmentCLI"]
RESOURCE_SUFFIXES = (".ui", ".png", ".svg", ".jpg", ".safetensors", ".json", ".toml", ".nii.gz", ".nii", ".nrrd",
                     ".mha", ".csv", ".txt", ".md", ".yaml", ".yml", ".npz")
SKIP_DIRS = {"__pycache__", ".pytest_cache", "Testing"}


def _skipped(rel: Path) -> bool:
    """Caches, tests, hidden folders and build output (``pip install -e`` writes ``*.egg-info``
    into the module folder; a Slicer build from a clean clone would not find those files)."""
    return any(part in SKIP_DIRS or part.startswith(".") or part.endswith(".egg-info") for part in rel.parts)


def module_files(module_dir: Path) -> Tuple[List[str], List[str]]:
    """(python scripts, resources) under a module folder, relative posix paths, sorted."""
    scripts, resources = [], []
    for f in sorted(module_dir.rglob("*")):
        rel = f.relative_to(module_dir)
        if not f.is_file() or _skipped(rel) or rel.name == "CMakeLists.txt":
            continue
        name = rel.name.lower()
        if name.endswith(".py"):
            scripts.append(rel.as_posix())
        elif name.endswith(RESOURCE_SUFFIXES) and not name.endswith((".tmp", ".pyc")):
            resources.append(rel.as_posix())
    return scripts, resources


def _strip_comments(text: str) -> str:
    """Drop ``# ...`` comments, keeping ``#`` inside quoted strings (URLs with anchors)."""
    out = []
    for line in text.splitlines():
        quoted = False
        for i, ch in enumerate(line):
            if ch == '"':
                quoted = not quoted
            elif ch == "#" and not quoted:
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


def cmake_sets(text: str) -> Dict[str, List[str]]:
    """``set(NAME a b c)`` blocks of a CMake file, with ``${VAR}`` of earlier single-value sets substituted."""
    text = _strip_comments(text)
    values: Dict[str, List[str]] = {}
    for m in re.finditer(r"\bset\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*(.*?)\)", text, re.S | re.I):
        name, body = m.group(1), m.group(2)
        tokens = re.findall(r'"[^"]*"|\S+', body)
        tokens = [t.strip('"') for t in tokens]
        expanded = []
        for t in tokens:
            for var, val in values.items():
                if len(val) == 1:
                    t = t.replace("${" + var + "}", val[0])
            expanded.append(t)
        values[name] = expanded
    return values


def macro_args(text: str, macro: str) -> Dict[str, List[str]]:
    m = re.search(rf"\b{macro}\s*\((.*?)\)", _strip_comments(text), re.S | re.I)
    assert m, f"{macro}(...) not found"
    args: Dict[str, List[str]] = {}
    key = None
    for tok in m.group(1).split():
        if tok.isupper() and not tok.startswith("$"):
            key = tok
            args[key] = []
        elif key:
            args[key].append(tok)
    return args


@pytest.mark.parametrize("module", SCRIPTED_MODULES)
def test_scripted_module_lists_every_file(module):
    folder = REPO / module
    text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    sets = cmake_sets(text)
    args = macro_args(text, "slicerMacroBuildScriptedModule")
    assert args["NAME"] == ["${MODULE_NAME}"] and sets["MODULE_NAME"] == [module]
    assert args["SCRIPTS"] == ["${MODULE_PYTHON_SCRIPTS}"] and args["RESOURCES"] == ["${MODULE_PYTHON_RESOURCES}"]
    listed_scripts = set(sets["MODULE_PYTHON_SCRIPTS"])
    listed_resources = set(sets["MODULE_PYTHON_RESOURCES"])
    scripts, resources = module_files(folder)
    missing = sorted(set(scripts) - listed_scripts) + sorted(set(resources) - listed_resources)
    assert not missing, (f"{module}/CMakeLists.txt does not list: {missing} "
                         "(python Testing/test_cmake_lists.py --write regenerates the lists)")
    stale = sorted(p for p in listed_scripts | listed_resources if not (folder / p).is_file())
    assert not stale, f"{module}/CMakeLists.txt lists files that do not exist: {stale}"
    assert not (listed_scripts & listed_resources), "a file is listed both as script and resource"
    assert all(p.endswith(".py") for p in listed_scripts), "non-.py file among MODULE_PYTHON_SCRIPTS"
    assert f"{module}.py" in listed_scripts
    assert f"Resources/UI/{module}.ui" in listed_resources and f"Resources/Icons/{module}.png" in listed_resources


def test_core_package_is_listed_in_denoise_module():
    sets = cmake_sets((REPO / "DualNetDenoise" / "CMakeLists.txt").read_text(encoding="utf-8"))
    scripts = set(sets["MODULE_PYTHON_SCRIPTS"])
    assert "dualnet/__init__.py" in scripts and "dualnet/api.py" in scripts
    assert "DualNetDenoiseLib/worker.py" in scripts and "DualNetDenoiseLib/cliargs.py" in scripts


def test_module_files_detects_an_unlisted_file(tmp_path):
    """The checker itself: a new file under a module folder shows up as unlisted."""
    (tmp_path / "Sub" / "__pycache__").mkdir(parents=True)
    (tmp_path / "Sub" / "new.py").write_text("", encoding="utf-8")
    (tmp_path / "Sub" / "w.safetensors").write_bytes(b"")
    (tmp_path / "Sub" / "__pycache__" / "x.py").write_text("", encoding="utf-8")
    (tmp_path / "CMakeLists.txt").write_text('set(URL "http://x#y")\nset(MODULE_PYTHON_SCRIPTS\n  a.py # comment\n  )\n', encoding="utf-8")
    scripts, resources = module_files(tmp_path)
    assert scripts == ["Sub/new.py"] and resources == ["Sub/w.safetensors"]
    sets = cmake_sets((tmp_path / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert sets["MODULE_PYTHON_SCRIPTS"] == ["a.py"] and sets["URL"] == ["http://x#y"]

    # and the --write helper fixes exactly that
    (tmp_path / "CMakeLists.txt").write_text("set(MODULE_PYTHON_SCRIPTS\n  a.py\n  )\n"
                                            "set(MODULE_PYTHON_RESOURCES\n  )\nslicerMacroBuildScriptedModule()\n", encoding="utf-8")
    assert rewrite_lists(tmp_path) and not rewrite_lists(tmp_path)
    sets = cmake_sets((tmp_path / "CMakeLists.txt").read_text(encoding="utf-8"))
    assert sets["MODULE_PYTHON_SCRIPTS"] == ["Sub/new.py"] and sets["MODULE_PYTHON_RESOURCES"] == ["Sub/w.safetensors"]


@pytest.mark.parametrize("module", CLI_MODULES)
def test_cli_module_cmake(module):
    folder = REPO / module
    text = (folder / "CMakeLists.txt").read_text(encoding="utf-8")
    sets = cmake_sets(text)
    args = macro_args(text, "SlicerMacroBuildScriptedCLI")
    assert sets["MODULE_NAME"] == [module] and args["NAME"] == ["${MODULE_NAME}"]
    assert (folder / f"{module}.py").is_file() and (folder / f"{module}.xml").is_file()
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in
                   (f"{module}.py", f"{module}.xml", "CMakeLists.txt"))
    assert not extra, f"{module}: files SlicerMacroBuildScriptedCLI would not install: {extra}"


def test_top_level_cmake():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    sets = cmake_sets(text)
    assert re.search(r"cmake_minimum_required\s*\(", text)
    assert re.search(r"\bproject\s*\(\s*DualNet\s*\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert sets.get(var), f"{var} missing or empty"
    assert sets["EXTENSION_CATEGORY"] == ["Filtering"]
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert sets["EXTENSION_ICONURL"][0].endswith("Resources/Icons/DualNet.png")
    assert (REPO / "Resources" / "Icons" / "DualNet.png").is_file()
    body = _strip_comments(text)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in body, line
    subdirs = re.findall(r"add_subdirectory\s*\(\s*(\S+?)\s*\)", body)
    assert sorted(subdirs) == sorted(SCRIPTED_MODULES + CLI_MODULES)
    on_disk = sorted(p.parent.name for p in REPO.glob("*/CMakeLists.txt"))
    assert sorted(subdirs) == on_disk, "a module folder with a CMakeLists.txt is not added (or vice versa)"
    assert body.index("include(${Slicer_USE_FILE})") < body.index("add_subdirectory") < \
        body.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})")


def test_extension_icon_is_128px_png():
    from PIL import Image

    with Image.open(REPO / "Resources" / "Icons" / "DualNet.png") as im:
        assert im.format == "PNG" and im.size == (128, 128)


def test_extensions_index_entry_matches_cmake():
    """The catalog entry (submitted to Slicer/ExtensionsIndex) agrees with the top-level CMake metadata."""
    import json

    entry = json.loads((REPO / "Resources" / "ExtensionsIndex" / "DualNet.json").read_text(encoding="utf-8"))
    sets = cmake_sets((REPO / "CMakeLists.txt").read_text(encoding="utf-8"))
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert set(entry) <= allowed, f"keys outside the catalog schema: {set(entry) - allowed}"
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == sets["EXTENSION_CATEGORY"][0]
    assert entry["build_dependencies"] == sets["EXTENSION_DEPENDS"]
    assert entry["scm_url"].startswith("https://") and entry["build_subdirectory"] == "."


# ------------------------------------------------------------------------------------------------
# Regenerating the explicit lists: ``python Testing/test_cmake_lists.py --write`` rewrites the two
# set(...) blocks of DualNetDenoise/CMakeLists.txt from the files present (the rest is kept).


def _format_block(name: str, items: List[str]) -> str:
    return f"set({name}\n" + "".join(f"  {p}\n" for p in items) + "  )"


def rewrite_lists(module_dir: Path = REPO / "DualNetDenoise") -> bool:
    """Rewrite MODULE_PYTHON_SCRIPTS / MODULE_PYTHON_RESOURCES of a module folder; True when it changed."""
    path = module_dir / "CMakeLists.txt"
    text = path.read_text(encoding="utf-8")
    scripts, resources = module_files(module_dir)
    new = text
    for name, items in (("MODULE_PYTHON_SCRIPTS", scripts), ("MODULE_PYTHON_RESOURCES", resources)):
        new, n = re.subn(rf"set\({name}\b[^)]*\)", lambda m: _format_block(name, items), new, count=1)
        assert n == 1, f"set({name} ...) block not found in {path}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    import sys

    if sys.argv[1:] != ["--write"]:
        print("usage: python Testing/test_cmake_lists.py --write   (regenerate DualNetDenoise/CMakeLists.txt lists)")
        sys.exit(2)
    print("updated" if rewrite_lists() else "already up to date")


def test_icon_and_screenshot_urls_point_at_files_in_the_repository():
    """The catalog shows EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS: each must name a real file."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    import re

    urls = []
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        m = re.search(rf'set\({key}\s+"([^"]+)"\)', text)
        assert m, key
        urls += m.group(1).split()
    for url in urls:
        rel = url.split("/main/", 1)[1]
        assert (REPO / rel).is_file(), f"{url}: {rel} missing from the repository"
