"""Static checks of the Slicer extension: UI names, CMake listings, metadata, icon, import hygiene."""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "DafneSlicer"
UI_FILE = MODULE / "Resources" / "UI" / "DafneSlicer.ui"
PANEL_SOURCES = [MODULE / "DafneSlicer.py", MODULE / "DafneSlicerLib" / "widget.py"]
WIDGET_NAME = re.compile(r"(Button|LineEdit|Label|ComboBox|CheckBox|Table|Selector|Bar)$")
SLICER_OWNED = {"numpy", "vtk", "simpleitk", "pydicom", "requests", "torch"}
HEAVY_MODULES = {"torch", "monai", "scipy", "safetensors", "slicerio", "nrrd"}


def _ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)


def _ui_names() -> set[str]:
    return {w.get("name") for w in _ui_tree().iter("widget")}


def _looked_up_names() -> set[str]:
    names: set[str] = set()
    for path in PANEL_SOURCES:
        source = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"\bui\.([A-Za-z_]\w*)", source))
        # Names reached through getattr(self.ui, name) sit in string tuples.
        names |= {node.value for node in ast.walk(ast.parse(source))
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and WIDGET_NAME.search(node.value)
                  and node.value.isidentifier()}
    return names


def test_every_widget_the_code_looks_up_exists_in_the_ui_file():
    looked_up = _looked_up_names()
    assert {"segmentButton", "modelComboBox", "shareCheckBox", "diceTable", "cancelButton"} <= looked_up
    missing = looked_up - _ui_names()
    assert not missing, f"widgets used in code but absent from {UI_FILE.name}: {sorted(missing)}"


def test_ui_parameter_bindings_name_parameter_node_fields():
    tree = ast.parse((MODULE / "DafneSlicerLib" / "parameter_node.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DafneSlicerParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    bound = {p.find("string").text for p in _ui_tree().iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound == {"inputVolume", "segmentation", "device"}
    assert bound <= fields


def test_share_section_is_collapsed_and_off_by_default():
    root = _ui_tree().getroot()
    share = root.find(".//widget[@name='shareCollapsibleButton']")
    assert share.find("property[@name='collapsed']/bool").text == "true"
    assert root.find(".//widget[@name='shareCheckBox']/property[@name='checked']/bool").text == "false"
    assert root.find(".//widget[@name='tokenLineEdit']/property[@name='echoMode']/enum").text == "QLineEdit::Password"


def _cmake_listed(text: str) -> set[str]:
    text = text.replace("${MODULE_NAME}", "DafneSlicer")
    return set(re.findall(r"^\s+([\w./-]+\.(?:py|ui|png|txt))\s*$", text, flags=re.MULTILINE))


def test_every_module_file_is_listed_in_cmake_and_every_listed_file_exists():
    listed = _cmake_listed((MODULE / "CMakeLists.txt").read_text(encoding="utf-8"))
    needed = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
              if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert needed - listed == set(), "files Slicer needs but CMake does not install"
    assert listed - needed == set(), "files CMake lists that do not exist"


def test_cmake_installs_dafne_logic_beside_the_module():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "${PROJECT_SOURCE_DIR}/Logic" in text and "/dafne_logic" in text
    for pattern in ("${DAFNE_LOGIC_DIR}/*.py", "bundled_models/*/manifest.json", "bundled_models/*/weights.safetensors"):
        assert pattern in text
    # The glob pattern finds every dafne_logic module, including subpackages (commands/).
    assert any(p.parent.name == "commands" for p in (REPO / "Logic").rglob("*.py"))


def test_top_level_cmake_declares_the_extension():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(DafneSlicer)" in text and "add_subdirectory(DafneSlicer)" in text
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{field} "[^"]+"\)', text), field
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert (REPO / "LICENSE").is_file()


def test_extensions_index_entry():
    entry = json.loads((REPO / "DafneSlicer.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://") and entry["build_subdirectory"] == "."


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "DafneSlicer.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


@pytest.mark.parametrize("path", sorted(MODULE.rglob("*.py")), ids=lambda p: p.relative_to(MODULE).as_posix())
def test_module_file_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_module_defines_the_four_slicer_classes():
    tree = ast.parse((MODULE / "DafneSlicer.py").read_text(encoding="utf-8"))
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["DafneSlicer"] == ["ScriptedLoadableModule"]
    assert classes["DafneSlicerWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["DafneSlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["DafneSlicerTest"] == ["ScriptedLoadableModuleTest"]


@pytest.mark.parametrize("path", sorted([MODULE / "DafneSlicer.py", *(MODULE / "DafneSlicerLib").glob("*.py")]),
                         ids=lambda p: p.name)
def test_no_heavy_dependency_is_imported_when_slicer_loads_the_module(path):
    """torch & co. may be missing until the user agrees to install them: import them inside functions only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {alias.name.split(".")[0] for n in top_level if isinstance(n, ast.Import) for alias in n.names}
    modules |= {n.module.split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert not modules & HEAVY_MODULES
    # dafne_logic modules imported at top level must themselves be free of heavy imports.
    for n in top_level:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("dafne_logic."):
            logic = REPO / "Logic" / (n.module.split(".", 1)[1].replace(".", "/") + ".py")
            logic_tree = ast.parse(logic.read_text(encoding="utf-8"))
            logic_modules = {a.name.split(".")[0] for m in logic_tree.body if isinstance(m, ast.Import) for a in m.names}
            logic_modules |= {m.module.split(".")[0] for m in logic_tree.body
                              if isinstance(m, ast.ImportFrom) and m.module and not m.level}
            assert not logic_modules & HEAVY_MODULES, f"{n.module} imports {logic_modules & HEAVY_MODULES}"


def test_requirements_never_touch_slicers_own_packages():
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    names = {Requirement(line).name.lower() for line in lines if line}
    assert "monai" in names and not names & SLICER_OWNED
