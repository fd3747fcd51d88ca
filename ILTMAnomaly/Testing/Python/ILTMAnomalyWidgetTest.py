"""In Slicer (CTest): leaving the module and coming back keeps the panel bound exactly once to its parameters.

Before Slicer 5.10, ``connectGui`` returned no tag, so ``exit()`` could not disconnect and every return to the
module added connections: a disconnected-looking panel kept writing into the parameter node. Run by CTest
through ``slicer_add_python_unittest`` (ILTMAnomaly/Testing/Python/CMakeLists.txt), or from Slicer's Python
console with ``slicer.testing.runUnitTest(path_to_this_folder, "ILTMAnomalyWidgetTest")``.
"""

import unittest

import slicer


class ILTMAnomalyWidgetTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_leaving_the_module_disconnects_the_panel(self):
        slicer.util.selectModule("ILTMAnomaly")
        widget = slicer.modules.iltmanomaly.widgetRepresentation().self()
        combo = widget.ui.presetComboBox
        widget.logic.getParameterNode().preset = "paper"
        slicer.app.processEvents()
        self.assertEqual(combo.currentText, "paper")
        for _ in range(3):
            slicer.util.selectModule("Data")
            combo.currentText = "tiny"          # the panel is hidden and disconnected: nothing is written
            self.assertEqual(widget.logic.getParameterNode().preset, "paper")
            slicer.util.selectModule("ILTMAnomaly")
            slicer.app.processEvents()
            self.assertEqual(combo.currentText, "paper")
        combo.currentText = "small"             # connected again, once
        self.assertEqual(widget.logic.getParameterNode().preset, "small")

    def runTest(self):
        self.setUp()
        self.test_leaving_the_module_disconnects_the_panel()
