"""The panel's files and the decisions that need no scene: the .ui against what the module uses, the
control table, the Slicer version gate, licences, server settings, first-use dependencies, reload
and the self-test's skip under ctest."""

from __future__ import annotations

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from slicer_scene import MODULE_DIR, ROOT

from medsam2.errors import InvalidPromptError
from MedSAM2SlicerLib import dependencies, versions
from MedSAM2SlicerLib.licences import LicenceRecord, licenceQuestion
from MedSAM2SlicerLib.panel_state import PROMPT_CONTROLS, SESSION_CONTROLS, Activity, controlStates
from MedSAM2SlicerLib.remote_settings import InsecureServerError, ServerSettings

UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedSAM2Slicer.ui"
MODULE_FILE = MODULE_DIR / "MedSAM2Slicer.py"

# Widget classes a .ui can use in Slicer 5.10: Qt's own, CTK's, and those with a Qt Designer plugin in
# Slicer's source (Libs/MRML/Widgets/DesignerPlugins, Modules/Loadable/Segmentations/Widgets/
# DesignerPlugins, Modules/Loadable/Terminologies/Widgets/DesignerPlugins on branch 5.10).
SLICER_UI_CLASSES = {
    "QWidget", "QFrame", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QSpinBox", "QLineEdit",
    "QProgressBar", "QToolButton",
    "ctkCollapsibleButton", "ctkPathLineEdit",
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qMRMLSegmentEditorWidget",
    "qSlicerTerminologyNavigatorWidget",
}  # fmt: skip


def _ui_widgets() -> dict[str, str]:
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    assert len(widgets) == len(list(tree.iter("widget"))), "duplicate widget names in the .ui"
    return widgets


def _ui_names_used() -> set[str]:
    """Every ``self.ui.<name>`` in the module file."""
    return {
        node.attr
        for node in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }


def test_every_widget_the_module_and_the_control_table_use_exists_with_a_class_slicer_has():
    widgets = _ui_widgets()
    used = _ui_names_used() | set(SESSION_CONTROLS) | set(PROMPT_CONTROLS) | set(controlStates(Activity.IDLE))
    assert len(used) > 25
    assert not used - set(widgets), f"used but not in the .ui: {sorted(used - set(widgets))}"
    unknown = {name: cls for name, cls in widgets.items() if cls not in SLICER_UI_CLASSES}
    assert not unknown, f"widget classes Slicer 5.10 cannot load from a .ui: {unknown}"
    # Each custom class is declared, as Qt Designer files must.
    declared = {c.findtext("class") for c in ET.parse(UI_FILE).iter("customwidget")}
    assert {c for c in widgets.values() if c[0] in "cq"} <= declared


def test_widgets_bound_to_the_parameter_node_match_its_parameters():
    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(
        n
        for n in module.body
        if isinstance(n, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper" for d in n.decorator_list)
    )
    annotations = {s.target.id: ast.unparse(s.annotation) for s in wrapper.body if isinstance(s, ast.AnnAssign)}
    widgets = _ui_widgets()
    bound = {}
    for widget in ET.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    assert len(bound) >= 12
    expected_for = {"str": {"QLineEdit"}, "bool": {"QCheckBox", "QPushButton"}}
    for widget_name, parameter in bound.items():
        annotation, widget_class = annotations[parameter], widgets[widget_name]
        if "vtkMRML" in annotation:
            expected = {"qMRMLNodeComboBox"}
        elif "Choice" in annotation:
            expected = {"QComboBox"}
        else:
            expected = expected_for.get(annotation, {"QSpinBox"})
        assert widget_class in expected, f"{widget_name} ({widget_class}) cannot show {parameter}: {annotation}"


def test_controls_follow_the_activity():
    idle = controlStates(Activity.IDLE, canUndo=True)
    assert idle["applyButton"] and idle["undoButton"] and idle["addSegmentButton"] and idle["positivePointButton"]
    encoding = controlStates(Activity.ENCODING, canUndo=True)
    assert encoding == idle, "background encoding never disables anything"
    previewing = controlStates(Activity.PREVIEWING, canUndo=True)
    assert previewing["positivePointButton"] and previewing["applyButton"] and not previewing["undoButton"]
    running = controlStates(Activity.PROPAGATING, canUndo=True, canRedo=True)
    assert running["applyButton"], "Propagate becomes Cancel"
    assert not any(running[name] for name in SESSION_CONTROLS + PROMPT_CONTROLS)
    assert not controlStates(Activity.CANCELLING)["applyButton"]
    none = controlStates(Activity.NO_INPUT)
    assert not none["applyButton"] and not none["positivePointButton"] and not none["exportDicomSegButton"]


@pytest.mark.parametrize(
    "version,problem",
    [
        ("5.8.1", "MedSAM2 needs Slicer 5.10 or later (this is Slicer 5.8); install a current Slicer"),
        ("5.6.2", "MedSAM2 needs Slicer 5.10 or later (this is Slicer 5.6); install a current Slicer"),
        ("5.10.0", None),
        ("5.11.0-2025-07-02", None),
        ("6.0.0", None),
    ],
)
def test_the_panel_says_in_one_line_which_slicer_it_needs(version, problem):
    found = versions.versionProblem(version)
    assert (found is None) == (problem is None)
    if problem:
        assert found.startswith(problem) and "\n" not in found


def test_the_slicer_here_has_the_apis_the_panel_uses():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    assert versions.apiProblem(slicer) is None
    assert "vtkSlicerSegmentEditorLogic" in versions.apiProblem(object())


def test_a_non_permissive_model_asks_once_and_the_answer_is_kept_per_model():
    question = licenceQuestion("medsam2-latest")
    assert question is not None and "CC-BY-SA-4.0" in question.licence and "research and education" in question.licence
    assert question.link == "https://huggingface.co/wanglab/MedSAM2"
    assert licenceQuestion("sam2.1-tiny") is None, "Apache-2.0 needs no question"
    assert licenceQuestion("/data/department.pt") is None, "a local file downloads nothing"
    store: dict[str, str] = {}
    record = LicenceRecord(store)
    assert not record.accepted("medsam2-latest")
    record.accept("medsam2-latest")
    assert record.accepted("medsam2-latest") and not record.accepted("medsam2-ct-lesion")
    assert LicenceRecord(store).accepted("medsam2-latest"), "remembered"
    record.decline("medsam2-latest")
    assert not record.accepted("medsam2-latest")


def test_server_settings_require_https_off_this_machine_unless_confirmed(tmp_path):
    ServerSettings("http://127.0.0.1:8765", "t").check()
    ServerSettings("http://localhost:8765", "t").check()
    ServerSettings("https://gpu.hospital.org:8765", "t").check()
    with pytest.raises(InsecureServerError, match="gpu.hospital.org is reached over plain http"):
        ServerSettings("http://gpu.hospital.org:8765", "t").check()
    ServerSettings("http://gpu.hospital.org:8765", "t", allowPlainHttp=True).check()
    with pytest.raises(InvalidPromptError, match="no server token"):
        ServerSettings("https://gpu.hospital.org", " ").check()
    with pytest.raises(InvalidPromptError, match="CA file .* does not exist"):
        ServerSettings("https://gpu.hospital.org", "t", caFile=str(tmp_path / "none.pem")).check()
    with pytest.raises(InvalidPromptError, match="must look like https://HOST:PORT"):
        ServerSettings("gpu.hospital.org", "t").check()


def test_a_server_connection_test_names_an_unreachable_server_in_one_line():
    from medsam2.remote import ServerUnavailableError
    from MedSAM2SlicerLib.remote_settings import testConnection

    with pytest.raises(ServerUnavailableError) as failure:
        testConnection(ServerSettings("http://127.0.0.1:9", "token"))
    assert "127.0.0.1" in str(failure.value) and "\n" not in str(failure.value)


def test_the_send_to_field_names_a_dicomweb_server_or_a_dicom_node():
    from MedSAM2SlicerLib.dicom_export import SendTarget, parseSendTarget

    assert parseSendTarget("  ") is None
    assert parseSendTarget("https://pacs.example/dicom-web") == SendTarget(dicomwebUrl="https://pacs.example/dicom-web")
    assert parseSendTarget("ORTHANC@pacs.example:4242") == SendTarget(
        host="pacs.example", port=4242, calledAet="ORTHANC"
    )
    assert parseSendTarget("pacs.example") == SendTarget(host="pacs.example", port=104, calledAet="ANY-SCP")
    with pytest.raises(InvalidPromptError, match="send target must be"):
        parseSendTarget("ORTHANC@pacs.example:dicom")


def test_requirements_agree_with_pyproject_and_remote_needs_neither_torch_nor_sam2():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for location in ("local", "remote"):
        for req in dependencies.requirements_for(location):
            assert f'"{req}"' in pyproject, f"{req} differs from pyproject.toml's dependencies"
    local = {r.name for r in dependencies.requirements_for("local")}
    remote = {r.name for r in dependencies.requirements_for("remote")}
    assert {"torch", "sam2", "highdicom"} <= local
    assert "numpy" in remote and "highdicom" in remote and not {"torch", "torchvision", "sam2"} & remote


def test_the_remote_panel_imports_without_torch_or_sam2():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sam2', 'torchvision'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from MedSAM2SlicerLib import logic, remote_settings, licences, dicom_export\n"
        "engine = remote_settings.engineFor(remote_settings.ServerSettings('https://gpu.example:8765', 't'))\n"
        "assert type(engine).__name__ == 'RemoteEngineClient'\n"
    )
    _run_with_the_module_on_path(code)


def test_nothing_heavy_is_imported_before_the_dependency_check():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import MedSAM2SlicerLib, MedSAM2SlicerLib.dependencies, MedSAM2SlicerLib.worker, MedSAM2SlicerLib.versions;"
        "MedSAM2SlicerLib.dependencies.plan_installation();"
        "heavy = [m for m in ('torch', 'sam2', 'medsam2', 'slicer') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    _run_with_the_module_on_path(code)


def test_the_self_test_skips_with_its_reason_in_the_method_ctest_calls():
    reason = dependencies.self_test_skip_reason(module_present=lambda name: name != "torch")
    assert reason == "MedSAM2 self-test skipped: torch not installed (install them from the module panel)"
    assert dependencies.self_test_skip_reason(module_present=lambda name: True) is None
    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    test_class = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "MedSAM2SlicerTest")
    methods = {f.name: f for f in test_class.body if isinstance(f, ast.FunctionDef)}
    ctest_method = methods["test_MedSAM2Slicer_sampleData"]  # what slicer.testing.runUnitTest loads by name
    first = ast.unparse(ctest_method.body[0]) + ast.unparse(ctest_method.body[1])
    assert "self_test_skip_reason()" in first and "self.skipTest(reason)" in first


def test_one_logic_class_and_the_lib_reloads(monkeypatch):
    source = MODULE_FILE.read_text(encoding="utf-8")
    classes = [n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)]
    lib_classes = [
        n.name
        for path in (MODULE_DIR / "MedSAM2SlicerLib").glob("*.py")
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.ClassDef)
    ]
    assert classes.count("MedSAM2SlicerLogic") == 1 and "MedSAM2SlicerLogic" not in lib_classes
    assert "def segment(" in source and "reloading.reloadLib()" in source
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    # In a fresh process: reloading here would give the other tests' imports stale classes.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import MedSAM2SlicerLib.logic as logic\n"
        "from MedSAM2SlicerLib import reloading, writer\n"
        "old_logic, old_writer = logic.PanelLogic, writer.SegmentWriter\n"
        "names = reloading.reloadLib()\n"
        "assert logic.PanelLogic is not old_logic and writer.SegmentWriter is not old_writer\n"
        "assert names.index('MedSAM2SlicerLib.writer') < names.index('MedSAM2SlicerLib.logic'), names\n"
    )
    _run_with_the_module_on_path(code)
    listed = {f"MedSAM2SlicerLib.{n}" for n in reloading_order()}
    present = {
        f"MedSAM2SlicerLib.{p.stem}"
        for p in (MODULE_DIR / "MedSAM2SlicerLib").glob("*.py")
        if p.stem not in ("__init__", "reloading")
    }
    assert present == listed, "every Lib module is reloaded"


def reloading_order():
    from MedSAM2SlicerLib.reloading import ORDER

    return ORDER


def test_no_source_or_test_module_of_the_panel_is_over_600_lines():
    files = [
        MODULE_FILE,
        *(MODULE_DIR / "MedSAM2SlicerLib").glob("*.py"),
        *(ROOT / "Testing" / "Python").glob("test_slicer_*.py"),
    ]
    long = {f.name: n for f in files if (n := len(f.read_text().splitlines())) > 600}
    assert not long, long


def test_module_compiles_and_cmake_lists_every_script_and_resource():
    compile(MODULE_FILE.read_text(encoding="utf-8"), str(MODULE_FILE), "exec")
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedSAM2Slicer")
    scripts = ["MedSAM2Slicer.py"] + [
        f"MedSAM2SlicerLib/{p.name}" for p in (MODULE_DIR / "MedSAM2SlicerLib").glob("*.py")
    ]
    for script in scripts:
        assert script in module_cmake, f"{script} missing from MedSAM2Slicer/CMakeLists.txt"
    for resource in (
        "Resources/Icons/MedSAM2Slicer.png",
        "Resources/UI/MedSAM2Slicer.ui",
        "Resources/requirements.txt",
        "Resources/requirements-remote.txt",
    ):
        assert resource in module_cmake and (MODULE_DIR / resource).is_file(), resource


def _run_with_the_module_on_path(code: str) -> None:
    """``code`` in a fresh interpreter, given the module folder as argv[1]; it must exit 0."""
    run = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
