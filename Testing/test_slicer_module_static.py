"""Static checks of the Slicer extension: UI names, CMake listings, metadata, icon, import hygiene."""

from __future__ import annotations

import ast
import json
import py_compile
import re
import subprocess
import sys
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
    assert bound == {"inputVolume", "segmentation", "device", "singleLegSide"}
    assert bound <= fields



def test_single_leg_side_combo_box_in_the_segment_section():
    from DafneSlicerLib.segmentation_logic import SINGLE_LEG_SIDES

    section = _ui_tree().getroot().find(".//widget[@name='segmentCollapsibleButton']")
    combo = section.find(".//widget[@name='sideComboBox']")
    assert tuple(item.find("property/string").text for item in combo.iter("item")) == SINGLE_LEG_SIDES
    tooltip = combo.find("property[@name='toolTip']/string").text
    assert "one leg" in tooltip and "midline" in tooltip
    assert section.find(".//widget[@name='sideLabel']/property[@name='text']/string").text == "Single leg side:"

def test_share_section_is_collapsed_and_off_by_default():
    root = _ui_tree().getroot()
    share = root.find(".//widget[@name='shareCollapsibleButton']")
    assert share.find("property[@name='collapsed']/bool").text == "true"
    assert root.find(".//widget[@name='shareCheckBox']/property[@name='checked']/bool").text == "false"
    assert root.find(".//widget[@name='tokenLineEdit']/property[@name='echoMode']/enum").text == "QLineEdit::Password"


def _cmake_listed(text: str) -> set[str]:
    text = text.replace("${MODULE_NAME}", "DafneSlicer")
    return set(re.findall(r"^\s+([\w./-]+\.(?:py|ui|png|txt|json))\s*$", text, flags=re.MULTILINE))


def test_every_module_file_is_listed_in_cmake_and_every_listed_file_exists():
    listed = _cmake_listed((MODULE / "CMakeLists.txt").read_text(encoding="utf-8"))
    needed = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
              if p.is_file() and p.name != "CMakeLists.txt" and "__pycache__" not in p.parts}
    assert needed - listed == set(), "files Slicer needs but CMake does not install"
    assert listed - needed == set(), "files CMake lists that do not exist"


def _cmake_glob_recurse(text: str, variable: str, roots: dict[str, Path]) -> set[str]:
    """Files (relative to the RELATIVE folder) that ``file(GLOB_RECURSE variable ...)`` in ``text`` finds.

    CMake's GLOB_RECURSE matches the last component of each expression against files in every
    sub-folder of the folders its leading components match.
    """
    call = re.search(rf"file\(GLOB_RECURSE {variable}\b(.*?)\)", text, flags=re.DOTALL)
    assert call, f"no file(GLOB_RECURSE {variable} ...)"
    words = call.group(1).split()
    for name, path in roots.items():
        words = [w.replace("${" + name + "}", path.as_posix()) for w in words]
    relative = Path(words[words.index("RELATIVE") + 1])
    expressions = [w for w in words[words.index("RELATIVE") + 2:] if w != "CONFIGURE_DEPENDS"]
    found: set[str] = set()
    for expression in expressions:
        folder_glob, file_glob = expression.rsplit("/", 1)
        first_wildcard = min((folder_glob.find(c) for c in "*?[" if c in folder_glob), default=len(folder_glob))
        anchor = Path(folder_glob[:first_wildcard].rsplit("/", 1)[0] if first_wildcard < len(folder_glob) else folder_glob)
        rest = folder_glob[len(anchor.as_posix()):].lstrip("/")
        folders = [p for p in anchor.glob(rest) if p.is_dir()] if rest else [anchor]
        for folder in folders:
            found |= {f.relative_to(relative).as_posix() for f in folder.rglob(file_glob)
                      if f.is_file() and "__pycache__" not in f.parts}
    return found


def test_cmake_installs_every_dafne_logic_module_and_the_bundled_models():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    logic = REPO / "Logic"
    roots = {"DAFNE_LOGIC_DIR": logic, "PROJECT_SOURCE_DIR": REPO}
    assert re.search(r"set\(DAFNE_LOGIC_DIR \$\{PROJECT_SOURCE_DIR\}/Logic\)", text)
    scripts = _cmake_glob_recurse(text, "DAFNE_LOGIC_SCRIPTS", roots)
    resources = _cmake_glob_recurse(text, "DAFNE_LOGIC_RESOURCES", roots)
    modules = {p.relative_to(logic).as_posix() for p in logic.rglob("*.py") if "__pycache__" not in p.parts}
    assert "commands/segment.py" in modules and "__init__.py" in modules
    assert modules - scripts == set(), "dafne_logic modules the extension would not install"
    models = [d for d in (logic / "bundled_models").iterdir() if (d / "manifest.json").is_file()]
    assert {d.name for d in models} >= {"thigh", "leg"}
    model_files = {f.relative_to(logic).as_posix() for d in models for f in d.rglob("*") if f.is_file()}
    assert model_files - resources == set(), "bundled model files the extension would not install"
    # Both lists go to the same dafne_logic folder beside the module.
    install = re.search(r"ctkMacroCompilePythonScript\((.*?)\)", text, flags=re.DOTALL).group(1)
    assert '"${DAFNE_LOGIC_SCRIPTS}"' in install and '"${DAFNE_LOGIC_RESOURCES}"' in install
    assert "SOURCE_DIR ${DAFNE_LOGIC_DIR}" in install and "/dafne_logic" in install


def test_top_level_cmake_declares_the_extension():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "project(DafneSlicer)" in text and "add_subdirectory(DafneSlicer)" in text
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{field} "[^"]+"\)', text), field
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert (REPO / "LICENSE").is_file()



@pytest.mark.parametrize("field", ["ICONURL", "SCREENSHOTURLS"])
def test_extension_image_urls_name_files_in_this_repository(field):
    """The index shows these images from the repository's main branch: each must be a committed PNG."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.search(rf'set\(EXTENSION_{field} "([^"]+)"\)', text).group(1).split()
    prefix = "https://raw.githubusercontent.com/dafne-imaging/DafneSlicer/main/"
    for url in urls:
        assert url.startswith(prefix), url
        path = REPO / url[len(prefix):]
        assert path.is_file(), f"{url} names {path.relative_to(REPO)}, which does not exist"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size <= 300 * 1024


def test_screenshot_is_an_honest_reproducible_figure():
    script = (REPO / "Docs" / "make_figure.py").read_text(encoding="utf-8")
    assert 'DEFAULT_OUTPUT = REPO / "Docs" / "screenshot.png"' in script
    assert "command-line preview; not a Slicer screenshot" in script
    assert 'PHANTOM = {"region": "thigh", "shape": (20, 432, 432), "seed": 2024}' in script

def test_extensions_index_entry():
    entry = json.loads((REPO / "DafneSlicer.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://") and entry["build_subdirectory"] == "."


def test_shipped_terminology_file_is_what_the_label_tables_give():
    from DafneSlicerLib.terminology import TERMINOLOGY_FILE, terminology_json

    assert TERMINOLOGY_FILE.read_text(encoding="utf-8") == terminology_json(), (
        "regenerate it: python DafneSlicer/DafneSlicerLib/terminology.py")


def test_extensions_index_checks_names_and_urls():
    """What the index's check_description_files.py enforces: the extension name does not start with
    'Slicer', the repository name contains 'slicer', CMake's project() is the index file's name, and
    homepage, icon and screenshots are https URLs, all of the repository that scm_url names."""
    from urllib.parse import urlsplit

    entry = json.loads((REPO / "DafneSlicer.json").read_text(encoding="utf-8"))
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"^project\((\w+)\)", cmake, flags=re.MULTILINE).group(1)
    assert project == "DafneSlicer" == Path("DafneSlicer.json").stem and not project.lower().startswith("slicer")
    scm = urlsplit(entry["scm_url"])
    owner, repository = scm.path.strip("/").removesuffix(".git").split("/")
    assert scm.scheme == "https" and scm.netloc == "github.com" and "slicer" in repository.lower()
    urls = [re.search(rf'set\(EXTENSION_{field} "([^"]+)"\)', cmake).group(1).split()
            for field in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS")]
    for url in sum(urls, []):
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.path.strip("/").split("/")[:2] == [owner, repository], url


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


def _module_file(name: str) -> Path | None:
    """Source file of a dafne_logic / DafneSlicerLib module name (None: another package)."""
    package, *parts = name.split(".")
    roots = {"dafne_logic": REPO / "Logic", "DafneSlicerLib": MODULE / "DafneSlicerLib"}
    if package not in roots:
        return None
    base = roots[package].joinpath(*parts)
    return next((c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()), None)


def _package_of(path: Path) -> str:
    if path == MODULE / "DafneSlicer.py":
        return ""
    root, package = ((REPO / "Logic", "dafne_logic") if REPO / "Logic" in path.parents
                     else (MODULE / "DafneSlicerLib", "DafneSlicerLib"))
    return ".".join([package, *path.parent.relative_to(root).parts])


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved; ``from m import x``
    also yields ``m.x``, which may be a submodule). ``top_level_only``: statements run on import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path).split(".")
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _reached(start: list[Path], top_level_only: bool) -> tuple[set[Path], set[str]]:
    """Our source files reachable through imports from ``start``, and the other modules they import."""
    seen: set[Path] = set()
    external: set[str] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path, top_level_only):
            target = _module_file(name)
            if target is not None:
                todo.append(target)
                # importing dafne_logic.x runs dafne_logic/__init__.py first
                todo += [f for f in [_module_file(name.split(".")[0])] if f is not None]
            elif name.split(".")[0] not in {"dafne_logic", "DafneSlicerLib"}:
                external.add(name.split(".")[0])
    return seen, external


SLICER_FILES = sorted([MODULE / "DafneSlicer.py", *(MODULE / "DafneSlicerLib").glob("*.py")])


@pytest.mark.parametrize("path", SLICER_FILES, ids=lambda p: p.name)
def test_no_heavy_dependency_is_imported_when_slicer_loads_the_module(path):
    """torch & co. may be missing until the user agrees to install them: import them inside functions only,
    in the module and in every dafne_logic module its imports reach when it loads (followed recursively)."""
    files, external = _reached([path], top_level_only=True)
    assert not external & HEAVY_MODULES, f"{path.name} loads {sorted(external & HEAVY_MODULES)} through {sorted(f.name for f in files)}"


def test_the_recursive_import_check_sees_heavy_imports_behind_relative_imports():
    files, external = _reached([REPO / "Logic" / "inference" / "segment.py"], top_level_only=True)
    assert "torch" in external and REPO / "Logic" / "inference" / "model_package.py" in files


# Modules of the extension that load without Qt (the others need Slicer's application).
QT_FREE = ["DafneSlicerLib.controller", "DafneSlicerLib.worker", "DafneSlicerLib.jobs", "DafneSlicerLib.install_logic",
           "DafneSlicerLib.segmentation_logic", "DafneSlicerLib.learning_logic", "DafneSlicerLib.sync_logic",
           "DafneSlicerLib.review"]


def test_qt_free_modules_import_with_torch_and_monai_missing():
    """Import for real in a fresh interpreter where ``import torch`` / ``import monai`` fail."""
    script = ("import importlib, sys\n"
              "for name in ('torch', 'monai', 'scipy', 'safetensors', 'slicerio', 'nrrd'):\n"
              "    sys.modules[name] = None\n"
              f"for name in {QT_FREE!r}:\n"
              "    importlib.import_module(name)\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=MODULE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_gui_thread_lists_and_checks_models_without_torch():
    """What the panel does on Slicer's GUI thread (fill the model list, check the model before a job)
    must not import torch: a cold CUDA torch import freezes Slicer for seconds. Run for real in a
    fresh interpreter where torch, monai and safetensors cannot be imported."""
    script = ("import sys\n"
              "for name in ('torch', 'monai', 'safetensors'):\n"
              "    sys.modules[name] = None\n"
              "from DafneSlicerLib.segmentation_logic import SegmentationLogic\n"
              "logic = SegmentationLogic()\n"
              "names = [choice.name for choice in logic.list_models()]\n"
              "manifest = logic.check_model('leg')\n"
              "print(','.join(names), manifest.labels.n_muscles)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=MODULE, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names, n_muscles = done.stdout.split()
    assert {"thigh", "leg"} <= set(names.split(",")) and n_muscles == "6"


# Packages Slicer's own Python provides (PyTorchUtils: the PyTorch extension this one depends on).
SLICER_PROVIDED = SLICER_OWNED | {"slicer", "qt", "ctk", "vtk", "mrml", "packaging", "pytorchutils"}


def test_requirements_cover_every_package_the_module_and_its_logic_import():
    """Every third-party import reachable from the module (inside functions too) is installed by
    requirements.txt or comes with Slicer."""
    _, external = _reached(SLICER_FILES, top_level_only=False)
    third_party = {name.lower() for name in external if name not in sys.stdlib_module_names and name != "__future__"}
    assert {"filelock", "monai", "slicerio"} <= third_party
    missing = third_party - _requirement_names() - SLICER_PROVIDED
    assert not missing, f"imported but neither in requirements.txt nor part of Slicer: {sorted(missing)}"


def _requirement_names() -> set[str]:
    from packaging.requirements import Requirement

    lines = [line.split("#")[0].strip() for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()]
    return {Requirement(line).name.lower() for line in lines if line}


def test_requirements_never_touch_slicers_own_packages():
    names = _requirement_names()
    assert "monai" in names and not names & SLICER_OWNED


def test_a_source_checkout_added_through_additional_module_paths_finds_dafne_logic(tmp_path):
    """Without the extension build no dafne_logic is installed beside the module: Logic/ stands in for it,
    in Slicer's Python and in the worker processes (run here by an interpreter without site-packages)."""
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import DafneSlicerLib, dafne_logic.core.paths\n"
              "print(dafne_logic.core.paths.__file__)\n")
    result = subprocess.run([sys.executable, "-S", "-c", script, str(MODULE)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == REPO / "Logic" / "core" / "paths.py"
    batch = (MODULE / "Scripts" / "batch_segment.py").read_text(encoding="utf-8")
    assert batch.index("import DafneSlicerLib") < batch.index("from dafne_logic")  # the batch script too
