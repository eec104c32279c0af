"""Qt Designer files against the module code that loads them (no Qt needed).

* every .ui parses as XML and names each widget once;
* every ``self.ui.<name>`` used in the module file exists in its .ui;
* every ``SlicerParameterName`` names a field of the module's ``@parameterNodeWrapper`` class,
  on a widget type Slicer's GUI connectors accept for that field's type (a ``QComboBox`` needs a
  ``Choice`` str, a ``qMRMLNodeComboBox`` the same node classes, a node ``Union`` with ``None``, ...);
* node combo boxes get the scene through the ``mrmlSceneChanged`` connection.
The module files are read with ``ast``, never imported (they import qt and slicer).
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "DualNetDenoise": ("DualNetDenoiseParameterNode", REPO / "DualNetDenoise"),
    "DualNetTraining": ("DualNetTrainingParameterNode", REPO / "DualNetTraining"),
}

#: widget class -> predicate on the field annotation (as source text)
CONNECTORS = {
    "QComboBox": lambda ann: ann.startswith("Annotated[str, Choice("),
    "QCheckBox": lambda ann: ann == "bool",
    "QDoubleSpinBox": lambda ann: ann == "float" or ann.startswith("Annotated[float"),
    "ctkSliderWidget": lambda ann: ann.startswith("Annotated[float, WithinRange("),
    "QSpinBox": lambda ann: ann == "int" or ann.startswith("Annotated[int"),
    "QLineEdit": lambda ann: ann == "str",
    "ctkPathLineEdit": lambda ann: ann in ("pathlib.Path", "Path"),
    "qMRMLNodeComboBox": lambda ann: node_annotation_ok(ann),
}


def node_annotation_ok(ann: str) -> bool:
    """A node field: ``vtkMRMLX``, ``Optional[vtkMRMLX]`` or a Union of node classes WITH ``None``.

    Slicer's wrapper writes None as the default of a node field on a fresh parameter node; for a
    ``Union`` of node classes its serializer can only do that when ``None`` is a member
    (``TypeError: Unable to write value 'None'`` otherwise - issue 10, defect 1).
    """
    node = r"vtkMRML\w+"
    return bool(re.fullmatch(node, ann) or re.fullmatch(rf"Optional\[{node}\]", ann)
                or re.fullmatch(rf"Union\[{node}(, {node})*, None\]", ann))


def ui_tree(module):
    return ET.parse(MODULES[module][1] / "Resources" / "UI" / f"{module}.ui").getroot()


def widgets(root):
    return {w.get("name"): w for w in root.iter("widget")}


def prop(widget, name):
    for p in widget.findall("property"):
        if p.get("name") == name:
            child = list(p)[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text
    return None


def parameter_fields(module):
    """field name -> (annotation source, default source or None) of the wrapper class."""
    cls_name, folder = MODULES[module]
    source = (folder / f"{module}.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            decorators = [ast.unparse(d) for d in node.decorator_list]
            assert "parameterNodeWrapper" in decorators
            return {s.target.id: (ast.unparse(s.annotation), ast.unparse(s.value) if s.value else None)
                    for s in node.body if isinstance(s, ast.AnnAssign)}, source, tree
    raise AssertionError(f"{cls_name} not found in {module}.py")


def module_constants(tree):
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return consts


@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_and_names_are_unique(module):
    root = ui_tree(module)
    assert root.tag == "ui" and root.findtext("class") == module
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("qMRML", "ctk"))} <= declared


@pytest.mark.parametrize("module", MODULES)
def test_code_references_existing_widgets(module):
    _, source, _ = parameter_fields(module)
    referenced = set(re.findall(r"self\.ui\.(\w+)", source))
    assert referenced, "no self.ui references found"
    missing = referenced - set(widgets(ui_tree(module)))
    assert not missing, f"{module}.py uses widgets absent from the .ui: {sorted(missing)}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_match_fields_and_widget_types(module):
    fields, _, tree = parameter_fields(module)
    consts = module_constants(tree)
    bound = {}
    for name, w in widgets(ui_tree(module)).items():
        param = prop(w, "SlicerParameterName")
        if param is None:
            continue
        assert param in fields, f"widget {name}: SlicerParameterName '{param}' is not a field of the parameter node"
        stdset = [p.get("stdset") for p in w.findall("property") if p.get("name") == "SlicerParameterName"]
        assert stdset == ["0"], f"widget {name}: SlicerParameterName must be a dynamic property (stdset=\"0\")"
        assert param not in bound, f"parameter '{param}' bound to two widgets"
        bound[param] = w
        ann, default = fields[param]
        cls = w.get("class")
        assert cls in CONNECTORS, f"{name}: no GUI connector for {cls}"
        assert CONNECTORS[cls](ann), f"{name}: a {cls} cannot represent '{param}: {ann}'"
        if cls == "qMRMLNodeComboBox":
            assert sorted(prop(w, "nodeTypes")) == sorted(re.findall(r"vtkMRML\w+", ann))
        if cls == "QComboBox" and default is not None:
            choices_src = re.search(r"Choice\((.*)\)\]$", ann).group(1)
            choices = consts.get(choices_src) if choices_src in consts else None
            if choices is not None:
                assert ast.literal_eval(default) in choices
    assert bound, "no widget is bound to the parameter node"


@pytest.mark.parametrize("module", MODULES)
def test_node_selectors_receive_the_scene(module):
    root = ui_tree(module)
    top = root.find("widget").get("name")
    selectors = {n for n, w in widgets(root).items() if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors and selectors <= connected


def test_checker_catches_a_wrong_binding(tmp_path):
    """The type check itself: a QCheckBox bound to a float field must be rejected; a Union of node
    classes needs None (the form without it broke the panel in a real Slicer)."""
    assert not CONNECTORS["QCheckBox"]("Annotated[float, WithinRange(0.0, 1.0)]")
    assert not CONNECTORS["QComboBox"]("str")
    node_box = CONNECTORS["qMRMLNodeComboBox"]
    assert node_box("Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]")
    assert node_box("vtkMRMLScalarVolumeNode") and node_box("Optional[vtkMRMLTableNode]")
    assert not node_box("Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]")
    assert not node_box("Union[vtkMRMLSegmentationNode, None, vtkMRMLLabelMapVolumeNode]")
    assert not node_box("str")


@pytest.mark.parametrize("module", MODULES)
def test_node_unions_include_none(module):
    """Every parameter-node field that is a Union of node classes includes None (bound to a widget
    or not); the real wrapper checks it at run time in test_slicer_logic.py."""
    fields, _, _ = parameter_fields(module)
    for name, (ann, _) in fields.items():
        if ann.startswith(("Union[", "Optional[")) and "vtkMRML" in ann:
            assert node_annotation_ok(ann), f"{module}.{name}: '{ann}' must include None"
