"""Static checks of the Slicer module that need no Slicer: .ui <-> widget code <-> parameter class <-> CMake.

The Slicer application cannot run here, so these read the files: every ``self.ui.<name>`` the module uses is a
widget of the .ui; every ``SlicerParameterName`` is a parameter of the typed parameter class, bound to a widget
kind Slicer's parameterNodeWrapper can connect to that type; every Python file of the module is listed in its
CMakeLists.txt; the extension's CMakeLists.txt has its metadata; ILTMAnomalyLib never imports Qt.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ILTMAnomaly"
MODULE_FILE = MODULE_DIR / "ILTMAnomaly.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ILTMAnomaly.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = REPO / "CMakeLists.txt"

# Widget classes Slicer's parameterNodeWrapper connects, and the parameter types they represent.
CONNECTABLE = {
    "qMRMLNodeComboBox": "node", "ctkPathLineEdit": "path", "ctkDirectoryButton": "path", "QCheckBox": "bool",
    "QSpinBox": "int", "QSlider": "int", "QDoubleSpinBox": "float", "ctkSliderWidget": "float",
    "QComboBox": "choice", "QLineEdit": "str",
}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_widgets() -> dict[str, ElementTree.Element]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def widget_property(widget: ElementTree.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            return value.text if value.tag in ("string", "number", "double", "bool", "enum", "set") else value
    return None


def bound_widgets() -> dict[str, tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class)."""
    bound = {}
    for name, widget in ui_widgets().items():
        parameter = widget_property(widget, "SlicerParameterName")
        if parameter:
            assert parameter not in bound, f"parameter {parameter} is bound to two widgets"
            bound[parameter] = (name, widget.get("class"))
    return bound


def parameter_class() -> ast.ClassDef:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return node
    raise AssertionError("no @parameterNodeWrapper class in ILTMAnomaly.py")


def parameters() -> dict[str, ast.AnnAssign]:
    return {n.target.id: n for n in parameter_class().body if isinstance(n, ast.AnnAssign)}


def kind_of(annotation: ast.expr) -> tuple[str, ast.Call | None, ast.Call | None]:
    """(kind, WithinRange call, Choice call) of a parameter annotation."""
    within = choice = None
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        base, *extras = annotation.slice.elts
        for extra in extras:
            if isinstance(extra, ast.Call) and getattr(extra.func, "id", "") == "WithinRange":
                within = extra
            if isinstance(extra, ast.Call) and getattr(extra.func, "id", "") == "Choice":
                choice = extra
    else:
        base = annotation
    text = ast.unparse(base)
    if text.startswith("vtkMRML"):
        return "node", within, choice
    if text in ("pathlib.Path", "Path"):
        return "path", within, choice
    if text == "str" and choice is not None:
        return "choice", within, choice
    return text, within, choice


def test_ui_is_well_formed_with_the_five_sections():
    widgets = ui_widgets()
    root = ElementTree.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    sections = [widget_property(w, "text") for w in root.find("widget").iter("widget")
                if w.get("class") == "ctkCollapsibleButton" and w.get("name") != "advancedDetectCollapsibleButton"]
    assert sections[:5] == ["Detect", "Review", "Export", "Train", "Iterations"]
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= declared
    # MRML widgets get the scene from the top-level widget's mrmlSceneChanged signal.
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    combos = {name for name, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos <= receivers


def test_every_ui_name_used_by_the_module_exists():
    names = set(ui_widgets())
    used = set()
    for node in ast.walk(module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    assert used, "the module uses no self.ui.<name>?"
    assert used - names == set(), f"self.ui names missing from {UI_FILE.name}"


def test_every_bound_parameter_exists_with_a_connectable_type():
    params = parameters()
    for parameter, (widget_name, widget_class) in bound_widgets().items():
        assert parameter in params, f"{widget_name} is bound to '{parameter}', which the parameter class lacks"
        assert widget_class in CONNECTABLE, f"{widget_name}: parameterNodeWrapper cannot connect a {widget_class}"
        kind, within, _ = kind_of(params[parameter].annotation)
        assert CONNECTABLE[widget_class] == kind, f"{widget_name} ({widget_class}) cannot show a {kind} parameter"
        if widget_class in ("ctkSliderWidget", "QSlider"):
            assert within is not None, f"{parameter}: a slider needs a bounded (WithinRange) type"


def test_special_values_and_defaults_fit_the_ranges():
    params = parameters()
    widgets = ui_widgets()
    for parameter, (widget_name, _) in bound_widgets().items():
        kind, within, choice = kind_of(params[parameter].annotation)
        default = params[parameter].value
        if within is not None:
            low, high = (float(ast.literal_eval(a)) for a in within.args)
            if default is not None and isinstance(default, ast.Constant):
                assert low <= default.value <= high, f"{parameter} default outside its range"
            special = widget_property(widgets[widget_name], "specialValueText")
            if special:
                # The special text ("last", "from run", "preset") shows at the minimum, which the range sets.
                assert low == float(widget_property(widgets[widget_name], "minimum")), parameter
        if choice is not None and isinstance(default, ast.Constant):
            assert "workflow." in ast.unparse(choice) or default.value in ast.literal_eval(choice.args[0])


def test_widget_slots_exist():
    tree = module_tree()
    widget_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ILTMAnomalyWidget")
    methods = {n.name for n in widget_class.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(widget_class):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "connect" and len(node.args) == 2:
            slot = node.args[1]
            if isinstance(slot, ast.Attribute) and isinstance(slot.value, ast.Name) and slot.value.id == "self":
                assert slot.attr in methods, f"slot {slot.attr} is not a method of the widget"


def test_module_is_laid_out_as_slicers_template():
    tree = module_tree()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases["ILTMAnomaly"] == ["ScriptedLoadableModule"]
    assert bases["ILTMAnomalyWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["ILTMAnomalyLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["ILTMAnomalyTest"] == ["ScriptedLoadableModuleTest"]
    widget_methods = {n.name for n in classes["ILTMAnomalyWidget"].body if isinstance(n, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "onSceneStartClose", "onSceneEndClose",
            "initializeParameterNode", "setParameterNode"} <= widget_methods
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert source.count("tryWithErrorDisplay") >= 8
    test_methods = {n.name for n in classes["ILTMAnomalyTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest", "test_ILTMAnomaly_end_to_end"} <= test_methods


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_module_cmakelists_lists_every_python_file_and_resource():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert not re.search(r"file\s*\(\s*GLOB", text, re.I), "list the files; a glob would hide a missing one"
    scripts = [s.replace("${MODULE_NAME}", "ILTMAnomaly") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    # ILTMAnomaly/Testing holds CTest scripts run in Slicer's build tree, not shipped with the module.
    on_disk = sorted(p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
                     if "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)
                     and p.relative_to(MODULE_DIR).parts[0] != "Testing")
    assert sorted(scripts) == on_disk, "ILTMAnomaly/CMakeLists.txt MODULE_PYTHON_SCRIPTS differs from the files"
    resources = [r.replace("${MODULE_NAME}", "ILTMAnomaly") for r in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for resource in resources:
        assert (MODULE_DIR / resource).is_file(), resource
    resource_files = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*")
                            if p.is_file())
    assert sorted(resources) == resource_files


def test_testing_is_wired_to_ctest_as_slicers_template_does():
    """Slicer's Utilities/Templates/Modules/Scripted (v5.10.0): add_subdirectory(Testing) under BUILD_TESTING,
    Testing/CMakeLists.txt adds Python/, which registers its unittest scripts with slicer_add_python_unittest."""
    module_cmake = MODULE_CMAKE.read_text(encoding="utf-8")
    testing_block = module_cmake[module_cmake.index("if(BUILD_TESTING)"):]
    assert "add_subdirectory(Testing)" in testing_block[:testing_block.index("endif()")]
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")
    python_cmake = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    registered = re.findall(r"^\s*slicer_add_python_unittest\(SCRIPT\s+(\S+?)\)", python_cmake, re.M)
    scripts = sorted(p.name for p in (MODULE_DIR / "Testing" / "Python").glob("*.py"))
    assert registered and sorted(registered) == scripts
    for script in scripts:
        compile((MODULE_DIR / "Testing" / "Python" / script).read_text(encoding="utf-8"), script, "exec")


def test_extension_index_readiness():
    """A LICENSE the metadata names, a description without the method's jargon, help text linking the docs."""
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    text = EXTENSION_CMAKE.read_text(encoding="utf-8")
    description = re.search(r'set\(EXTENSION_DESCRIPTION\s+"([^"]+)"\)', text).group(1)
    assert "PET" in description and "lesion" in description
    for jargon in ("VQ-VAE", "Transformer", "KDE", "ILTM", "latent", "token"):
        assert jargon not in description, f"'{jargon}' means nothing to a new user"
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE\s+"([^"]+)"\)', text).group(1)
    help_text = [node for node in ast.walk(module_tree()) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Attribute) and t.attr == "helpText" for t in node.targets)]
    assert len(help_text) == 1 and f'href="{homepage}"' in ast.unparse(help_text[0].value)


def test_extension_cmakelists_has_the_metadata():
    text = EXTENSION_CMAKE.read_text(encoding="utf-8")
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        match = re.search(rf'set\(EXTENSION_{field}\s+"([^"]+)"\)', text)
        assert match and match.group(1).strip(), f"EXTENSION_{field} is missing or empty"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"[^"]*\bPyTorch\b', text)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(ILTMAnomaly)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    screenshots = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]+)"\)', text).group(1).split()
    for url in screenshots:
        assert (REPO / "Resources" / "Screenshots" / url.rsplit("/", 1)[-1]).is_file(), url


def test_icons_are_128_pixels_square():
    import SimpleITK as sitk

    for path in (REPO / "Resources" / "Icons" / "ILTMAnomaly.png",
                 MODULE_DIR / "Resources" / "Icons" / "ILTMAnomaly.png"):
        assert sitk.ReadImage(str(path)).GetSize() == (128, 128), path


def test_mrml_glue_never_imports_qt():
    for path in sorted((MODULE_DIR / "ILTMAnomalyLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                names = []
            for name in names:
                assert name.split(".")[0] not in ("qt", "ctk", "PythonQt"), f"{path.name} imports {name}"
                assert ".qMRML" not in name and ".qSlicer" not in name, f"{path.name} imports {name}"
            if isinstance(node, ast.Attribute) and node.attr.startswith(("qMRML", "qSlicer")):
                raise AssertionError(f"{path.name} uses {node.attr}")


def test_importing_the_glue_installs_and_imports_nothing_heavy():
    code = ("import sys, subprocess\n"
            "calls = []\n"
            "subprocess.Popen.__init__ = lambda *a, **k: calls.append(a)\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import ILTMAnomalyLib, ILTMAnomalyLib.dependencies, ILTMAnomalyLib.jobs, ILTMAnomalyLib.overlay\n"
            "import ILTMAnomalyLib.runs, ILTMAnomalyLib.segments, ILTMAnomalyLib.volumes, ILTMAnomalyLib.workflow\n"
            "light = ('iltm', 'iltm.layout', 'iltm.errors')\n"  # the stdlib-only run-folder contract
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'scipy', 'qt', 'yaml')\n"
            "               or (m.startswith('iltm') and m not in light))\n"
            "print(heavy, len(calls))\n")
    result = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[] 0"


@pytest.mark.parametrize("name", ["ILTMAnomaly.py"] + [f"ILTMAnomalyLib/{p.name}" for p in
                                                        sorted((MODULE_DIR / "ILTMAnomalyLib").glob("*.py"))])
def test_module_sources_compile(name):
    compile((MODULE_DIR / name).read_text(encoding="utf-8"), name, "exec")


def test_questions_and_installs_never_run_under_the_wait_cursor():
    """A wait cursor over a confirmation dialog, or over minutes of pip, says "busy" while Slicer waits for the
    user or shows pip's own progress: dependency checks run before the waitCursor=True block."""
    offending = []
    for node in ast.walk(module_tree()):
        if not isinstance(node, ast.With):
            continue
        waits = any(isinstance(item.context_expr, ast.Call) and any(
            k.arg == "waitCursor" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in item.context_expr.keywords) for item in node.items)
        if not waits:
            continue
        for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr in (
                    "_ensureDependencies", "ensureDependencies", "confirmOkCancelDisplay", "confirmYesNoDisplay"):
                offending.append(f"line {inner.lineno}: {inner.func.attr}")
    assert not offending, offending


def test_module_and_glue_run_on_the_python_of_slicer_5_8():
    """Slicer 5.8 ships Python 3.9. vermin finds the oldest Python each construct needs; ``--eval-annotations``
    counts annotations as evaluated (Slicer's parameterNodeWrapper and dataclass tools read them at run time),
    where ``X | Y`` needs 3.10 even under ``from __future__ import annotations``."""
    vermin = pytest.importorskip("vermin")
    del vermin
    targets = [str(MODULE_FILE), str(MODULE_DIR / "ILTMAnomalyLib"), str(MODULE_DIR / "Testing" / "Python")]
    result = subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--no-tips", "--eval-annotations", "--feature",
                             "union-types", "--violations", "-t=3.9-", *targets],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    minimum = re.search(r"Minimum required versions: (\S+)", result.stdout)
    assert minimum, result.stdout
    assert tuple(int(part) for part in minimum.group(1).split(".")) <= (3, 9), result.stdout
