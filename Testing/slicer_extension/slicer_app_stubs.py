"""Stand-ins for the Qt-side pieces of Slicer's Python API, so ``ILTMAnomaly.py`` can be imported and its Logic
and Test classes run on the slicer-core wheel's real MRML.

What is faked (only what the module file touches outside its Widget class): ``qt``/``ctk`` (import only),
``slicer.i18n`` (identity), ``slicer.parameterNodeWrapper`` (a plain attribute holder with the class defaults),
``slicer.ScriptedLoadableModule`` (base classes; the Test base is ``unittest.TestCase``) and ``slicer.mrmlScene``.
The Widget class needs the real Qt application for ``setup()``, which is checked statically instead
(test_module_static.py); a few of its methods (enter/exit, cleanup) are driven with :class:`FakeUi` in place of
the loaded .ui.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import slicer

MODULE_FILE = Path(__file__).resolve().parents[2] / "ILTMAnomaly" / "ILTMAnomaly.py"


def _parameter_node_wrapper(cls):
    fields = dict(getattr(cls, "__annotations__", {}))

    def __init__(self, parameterNode=None):
        self.parameterNode = parameterNode
        for name in fields:
            setattr(self, name, getattr(cls, name, None))

    cls.__init__ = __init__
    cls.allParameters = fields
    return cls


class _Annotation:
    def __init__(self, *args):
        self.args = args


def _modules(scene) -> dict[str, types.ModuleType]:
    qt = types.ModuleType("qt")
    ctk = types.ModuleType("ctk")

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = _parameter_node_wrapper
    wrapper.WithinRange = type("WithinRange", (_Annotation,), {})
    wrapper.Choice = type("Choice", (_Annotation,), {})

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetAttribute("ModuleName", "ILTMAnomaly")
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    return {"qt": qt, "ctk": ctk, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted}


def import_module_file(monkeypatch, scene):
    """Import ILTMAnomaly.py with the stand-ins in place (undone by ``monkeypatch`` after the test)."""
    for name, module in _modules(scene).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("ILTMAnomaly", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ILTMAnomaly", module)
    spec.loader.exec_module(module)
    return module


# A stand-in for the panel's widgets (``self.ui``), to drive ILTMAnomalyWidget methods without Qt.
class FakeWidget:
    """Any attribute can be set; any method call does nothing; ``property`` answers SlicerParameterName."""

    def __init__(self, parameter_name=None):
        self.__dict__["parameter_name"] = parameter_name
        self.__dict__["connectors"] = set()

    def property(self, name):
        return self.parameter_name if name == "SlicerParameterName" else None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class FakeUi:
    def __init__(self, bound):
        for parameter in bound:
            setattr(self, f"{parameter}Widget", FakeWidget(parameter))

    def __getattr__(self, name):   # unbound widgets the panel touches (labels, buttons, views)
        widget = FakeWidget()
        setattr(self, name, widget)
        return widget
