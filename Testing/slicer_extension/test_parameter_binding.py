"""Leaving the module and coming back must not leave stale widget connections behind, on Slicer 5.8 and 5.10.

The stand-in for Slicer's ``parameterNodeWrapper`` is the narrowest one that shows the defect. It copies what
``Base/Python/slicer/parameterNodeWrapper/wrapper.py`` does at tags v5.8.1 and v5.10.0:

- ``connectParametersToGui(mapping)`` takes the next tag, stores one connector per widget under it, connects
  each connector to its widget and returns the tag (both tags);
- ``connectGui(gui)`` collects ``gui.__dict__`` values whose ``SlicerParameterName`` property is set and calls
  ``connectParametersToGui``; v5.8.1 drops the tag (returns None), v5.10.0 returns it (Slicer commit b5a65a49a0);
- ``disconnectGui(tag)`` disconnects and forgets the connectors of a known tag and ignores any other value;
- every ``logic.getParameterNode()`` returns a new wrapper of the same MRML node (as ``ILTMAnomalyLogic`` does),
  each with its own tags.

A connector that stays connected is what made the panel write stale values back (a cleared combo box wrote
index -1/0 into ``preset``): here a widget counts the connectors connected to it. Observers go to a real MRML
node, so the widget's VTKObservationMixin bookkeeping is real. The widget class itself is ILTMAnomaly.py's,
with a fake ``ui`` whose widgets accept whatever the panel sets on them.
"""

from __future__ import annotations

import pytest

import slicer
from ILTMAnomalyLib import parameters

from slicer_app_stubs import FakeUi, FakeWidget, import_module_file


class Connector:
    def __init__(self, widget):
        self.widget = widget

    def onChanged(self, callback):
        (self.widget.connectors.add if callback is not None else self.widget.connectors.discard)(self)


def stand_in_wrapper(parameter_class, scripted_node, connect_gui_returns_tag):
    class Wrapper(parameter_class):
        def __init__(self):
            super().__init__(scripted_node)
            self._parameterGUIs = {}
            self._nextParameterGUIsTag = 0

        def connectParametersToGui(self, mapping):
            tag = self._nextParameterGUIsTag
            self._nextParameterGUIsTag += 1
            self._parameterGUIs[tag] = {name: Connector(widget) for name, widget in mapping.items()}
            for connector in self._parameterGUIs[tag].values():
                connector.onChanged(lambda value: None)
            return tag

        def connectGui(self, gui):
            mapping = {w.property("SlicerParameterName"): w for w in gui.__dict__.values()
                       if w.property("SlicerParameterName")}
            tag = self.connectParametersToGui(mapping)
            return tag if connect_gui_returns_tag else None

        def disconnectGui(self, guiTag):
            if guiTag in self._parameterGUIs:
                for connector in self._parameterGUIs[guiTag].values():
                    connector.onChanged(None)
                del self._parameterGUIs[guiTag]

        def AddObserver(self, *args):
            return scripted_node.AddObserver(*args)

        def RemoveObserver(self, tag):
            scripted_node.RemoveObserver(tag)

    return Wrapper


BOUND = ("preset", "device", "trainingDevice", "runFolder")


@pytest.mark.parametrize("slicer_tag, returns_tag", [("v5.8.1", False), ("v5.10.0", True)])
def test_reentering_the_module_keeps_one_connection_per_widget(monkeypatch, scene, slicer_tag, returns_tag):
    module = import_module_file(monkeypatch, scene)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    wrapper = stand_in_wrapper(module.ILTMAnomalyParameterNode, node, returns_tag)

    widget = module.ILTMAnomalyWidget()
    widget.ui = FakeUi(BOUND)
    widget.logic = type("Logic", (), {"getParameterNode": lambda self: wrapper()})()
    bound = [getattr(widget.ui, f"{name}Widget") for name in BOUND]

    widget.enter()
    assert [len(w.connectors) for w in bound] == [1] * len(BOUND)
    for _ in range(3):
        widget.exit()
        assert [len(w.connectors) for w in bound] == [0] * len(BOUND), f"stale connections after exit ({slicer_tag})"
        widget.enter()
        assert [len(w.connectors) for w in bound] == [1] * len(BOUND), f"duplicated connections ({slicer_tag})"
    # Switching parameter nodes (scene close and reopen) disconnects the old one too.
    widget.setParameterNode(wrapper())
    assert [len(w.connectors) for w in bound] == [1] * len(BOUND)
    widget.setParameterNode(None)
    assert [len(w.connectors) for w in bound] == [0] * len(BOUND)
    widget.removeObservers()


def test_parameter_widgets_are_found_by_their_property():
    ui = FakeUi(("preset",))
    ui.statusLabel = FakeWidget()
    ui.notAWidget = 3
    assert parameters.parameter_widgets(ui) == {"preset": ui.presetWidget}
    parameters.disconnect_gui(None, 1)   # no node, or no tag: nothing to do
