import logging
import os
import pathlib
import tempfile
from typing import Annotated

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

from ILTMAnomalyLib import (PanelError, dependencies, jobs, overlay, parameters, runs, sampledata, segments, volumes,
                            workflow)

#
# ILTMAnomaly
#


class ILTMAnomaly(ScriptedLoadableModule):
    """Anomaly detection in PET with Iterative Latent Token Masking (ILTM), trained on scans that may all
    contain lesions. The heavy lifting runs in the ``iltm`` core, in a child process."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ILTM Anomaly")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["ILTMAnomaly contributors"]
        self.parent.helpText = _("""
Finds anomalies (e.g. lesions) in PET scans with a VQ-VAE + Transformer model trained by Iterative Latent Token
Masking, which learns what is normal from training scans that may all contain lesions.
<ul>
<li><b>Detect</b>: score a PET volume with a trained run folder or a model bundle (.zip, from 'iltm export'); in the
background, Cancel stops it. To try it at once: load "Synthetic PET" from Sample Data (ILTM Anomaly) and press Detect:
the model field defaults to a demo model trained on synthetic phantoms (not on patients).</li>
<li><b>Review</b>: the score in PET-Heat colours over the PET; the threshold slider updates the binary map live.</li>
<li><b>Export</b>: binary map to a segmentation (one segment per region), region statistics, .seg.nrrd, and DICOM SEG
for a PET loaded from DICOM.</li>
<li><b>Train</b>: train a run on a folder of scans, with progress per ILTM iteration, Cancel and Resume.</li>
<li><b>Iterations</b>: see what each ILTM iteration masked in each training scan, and the run's history.</li>
</ul>
See the <a href="https://github.com/ILTMAnomaly/ILTMAnomaly#readme">documentation</a> for a walk-through, the
command line and the method.
""")
        self.parent.acknowledgementText = _("""
The ILTM method (VQ-VAE, autoregressive Transformer, KDE scoring of healed reconstructions, iterative masking of
anomalous latent tokens) is implemented by the bundled <code>iltm</code> package, built on MONAI and PyTorch.
""")
        # Sample Data lists the synthetic PET once the application has started (all modules loaded).
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The synthetic PET phantom in the Sample Data module (a local file shipped with the extension)."""
    import SampleData

    sampledata.register(SampleData.SampleDataLogic)


#
# ILTMAnomalyParameterNode
#


@parameterNodeWrapper
class ILTMAnomalyParameterNode:
    """
    Detect:
    inputVolume - the PET to examine.
    runFolder - a run folder written by ``iltm train`` or a model bundle (.zip) written by ``iltm export``; the panel
        fills in the shipped demo model (synthetic phantoms) when it is empty.
    iteration - ILTM iteration whose Transformer scores the scan; -1 = the last trained one.
    device - "auto", "cuda" or "cpu".
    resamplingThreshold, samples, dropoutPasses, eps - detection options; 0 = the run's own value.
    densityThreshold - tau: voxels with KDE density below it are anomalous.

    Review:
    scoreVolume, binaryMap - detection results; binaryMap = scoreVolume > scoreThreshold.
    scoreThreshold - score (-ln density) above which a voxel is anomalous.
    overlayOpacity - opacity of the heat overlay.

    Export:
    splitComponents - one segment per connected region (else a single "Anomaly" segment).
    minimumRegionVolume - regions smaller than this (mL) are left out.
    segmentation, statisticsTable - the exported segmentation and its per-region table.
    segmentationFile - where "Save segmentation" writes (.seg.nrrd); "Save DICOM SEG" writes beside it (_seg.dcm).

    Train:
    trainingData, trainingOutput - folder of training scans, new run folder.
    preset - "tiny", "small" or "paper"; maxIterations - ILTM iterations after iteration 0 (-1 = preset's).
    trainingDevice - "auto", "cuda" or "cpu".

    Iterations:
    browserRunFolder, browserIteration - the run and iteration the browser shows.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    runFolder: pathlib.Path
    iteration: Annotated[int, WithinRange(-1, 999)] = -1
    device: Annotated[str, Choice(list(workflow.DEVICES))] = "auto"
    resamplingThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    samples: Annotated[int, WithinRange(0, 1000)] = 0
    dropoutPasses: Annotated[int, WithinRange(0, 100)] = 0
    eps: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    densityThreshold: Annotated[float, WithinRange(1e-5, 1.0)] = overlay.DEFAULT_DENSITY_THRESHOLD

    scoreVolume: vtkMRMLScalarVolumeNode
    binaryMap: vtkMRMLLabelMapVolumeNode
    scoreThreshold: Annotated[float, WithinRange(0.0, 50.0)] = overlay.score_threshold(
        overlay.DEFAULT_DENSITY_THRESHOLD)
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5

    splitComponents: bool = True
    minimumRegionVolume: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    segmentation: vtkMRMLSegmentationNode
    statisticsTable: vtkMRMLTableNode
    segmentationFile: pathlib.Path

    trainingData: pathlib.Path
    trainingOutput: pathlib.Path
    preset: Annotated[str, Choice(list(workflow.PRESETS))] = "small"
    maxIterations: Annotated[int, WithinRange(-1, 100)] = -1
    trainingDevice: Annotated[str, Choice(list(workflow.DEVICES))] = "auto"

    browserRunFolder: pathlib.Path
    browserIteration: Annotated[int, WithinRange(0, 999)] = 0


def _isSet(path) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# ILTMAnomalyWidget
#


class ILTMAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the panel to ILTMAnomalyLogic; no computation happens here."""

    JOB_POLL_MS = 250
    THRESHOLD_DELAY_MS = 120

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._detection = None
        self._trainingJob = None
        self._browserRun = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ILTMAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ILTMAnomalyLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.cancelDetectButton.connect("clicked(bool)", self.onCancelDetectButton)
        self.ui.showOverlayButton.connect("clicked(bool)", self.onShowOverlayButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.updateStatisticsButton.connect("clicked(bool)", self.onUpdateStatisticsButton)
        self.ui.saveSegmentationButton.connect("clicked(bool)", self.onSaveSegmentationButton)
        self.ui.saveDicomSegButton.connect("clicked(bool)", self.onSaveDicomSegButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.cancelTrainButton.connect("clicked(bool)", self.onCancelTrainButton)
        self.ui.browserLoadButton.connect("clicked(bool)", self.onBrowserLoadButton)
        self.ui.showHistoryButton.connect("clicked(bool)", self.onShowHistoryButton)
        self.ui.browserRunPathLineEdit.connect("currentPathChanged(QString)", self.onBrowserRunChanged)
        self.ui.browserIterationSlider.connect("valueChanged(int)", self.onBrowserIterationChanged)
        self.ui.scoreThresholdSliderWidget.connect("valueChanged(double)", self.onScoreThresholdChanged)
        self.ui.overlayOpacitySliderWidget.connect("valueChanged(double)", self.onOverlayOpacityChanged)
        self.ui.scoreVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onScoreVolumeChanged)

        # Jobs run in child processes; a timer reads their progress so the GUI never blocks.
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(self.JOB_POLL_MS)
        self._jobTimer.connect("timeout()", self.onJobTimer)
        # The binary map follows the threshold slider, recomputed once the slider rests for a moment.
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(self.THRESHOLD_DELAY_MS)
        self._thresholdTimer.connect("timeout()", self.updateBinaryMap)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer closes or the module is reloaded: detection stops (its results would have nowhere to go) and its
        scratch folder goes; a running training is stopped only if the user says so (see workflow.shut_down)."""
        self._jobTimer.stop()
        self._thresholdTimer.stop()
        workflow.shut_down(self._detection, self._trainingJob, stop_training=lambda: slicer.util.confirmYesNoDisplay(
            _("A training is still running. Stop it now?\n\nYes: it stops; finished ILTM iterations are kept and "
              "Resume continues the run.\nNo: it keeps running while Slicer stays open; when Slicer closes it ends "
              "at its next progress report, and Resume continues the run."), windowTitle=_("ILTM Anomaly")))
        self._detection = None
        self._trainingJob = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._disconnectParameterNode()

    def _disconnectParameterNode(self) -> None:
        parameters.disconnect_gui(self._parameterNode, self._parameterNodeGuiTag)
        self._parameterNodeGuiTag = None
        # exit() already removed it when the parameter node changes after leaving the module.
        if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates)

    def onSceneStartClose(self, caller, event) -> None:
        # The PET being scored is about to disappear: its results would have nowhere to go.
        if self._detection is not None:
            self._detection.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not _isSet(self._parameterNode.runFolder) and ILTMAnomalyLogic.defaultModel() is not None:
            self._parameterNode.runFolder = ILTMAnomalyLogic.defaultModel()
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Not connectGui: before Slicer 5.10 it returns None, and exit() could never disconnect.
            self._parameterNodeGuiTag = parameters.connect_gui(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtonStates)
            self.ui.scoreWindowLevelWidget.setMRMLVolumeNode(self._parameterNode.scoreVolume)
            self.ui.componentTableView.setMRMLTableNode(self._parameterNode.statisticsTable)
            self.onBrowserRunChanged()
            self._updateButtonStates()

    def _updateButtonStates(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        detecting = self._detection is not None
        training = self._trainingJob is not None
        self.ui.detectButton.enabled = bool(p.inputVolume and _isSet(p.runFolder)) and not detecting
        self.ui.detectButton.toolTip = (_("Run 'iltm detect' on the PET volume in the background.")
                                        if p.inputVolume and _isSet(p.runFolder)
                                        else _("Select a PET volume and a trained run folder or model bundle."))
        self.ui.cancelDetectButton.enabled = detecting
        self.ui.showOverlayButton.enabled = bool(p.inputVolume and p.scoreVolume)
        self.ui.exportButton.enabled = bool(p.inputVolume and p.binaryMap)
        self.ui.updateStatisticsButton.enabled = bool(p.inputVolume and p.segmentation)
        self.ui.saveSegmentationButton.enabled = bool(p.segmentation and _isSet(p.segmentationFile))
        fromDicom = bool(p.inputVolume and p.inputVolume.GetAttribute("DICOM.instanceUIDs"))
        self.ui.saveDicomSegButton.enabled = bool(p.segmentation and _isSet(p.segmentationFile) and fromDicom)
        self.ui.saveDicomSegButton.toolTip = (
            _("Write the segments as a DICOM SEG beside the .seg.nrrd (..._seg.dcm), referencing the PET's series.")
            if fromDicom else _("Needs a PET loaded with the DICOM module (Slicer's DICOM database)."))
        self.ui.trainButton.enabled = _isSet(p.trainingData) and _isSet(p.trainingOutput) and not training
        self.ui.resumeButton.enabled = _isSet(p.trainingOutput) and not training
        self.ui.cancelTrainButton.enabled = training

    # -- Detect --------------------------------------------------------------------------------------------------

    def _ensureDependencies(self) -> bool:
        # No wait cursor: the user reads a question, then pip runs for minutes with its own progress.
        with slicer.util.tryWithErrorDisplay(_("Cannot install the Python packages ILTM Anomaly needs."),
                                             waitCursor=False):
            return self.logic.ensureDependencies(
                confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("ILTM Anomaly")))
        return False

    def onDetectButton(self) -> None:
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start detection."), waitCursor=True):
            p = self._parameterNode
            self._detection = self.logic.startDetection(p.inputVolume, p.runFolder, self.logic.detectionSettings(p))
            self._log(" ".join(self._detection.job.argv))
            self.ui.detectProgressBar.value = 0
            self.ui.detectStatusLabel.text = _("Detecting with iteration {iteration}...").format(
                iteration=self._detection.iteration)
            self._jobTimer.start()
        self._updateButtonStates()

    def onCancelDetectButton(self) -> None:
        if self._detection is not None:
            self.ui.detectStatusLabel.text = _("Cancelling...")
            self._detection.job.cancel()
            self.onJobTimer()

    def _finishDetection(self) -> None:
        detection, self._detection = self._detection, None
        self._updateButtonStates()
        try:
            score, binaryMap = self.logic.finishDetection(detection)
        except PanelError as error:
            self.ui.detectStatusLabel.text = str(error)
            self._log(str(error))
            if detection.job.state is not jobs.JobState.CANCELLED:
                slicer.util.errorDisplay(str(error), windowTitle=_("ILTM Anomaly"))
            return
        p = self._parameterNode
        p.scoreVolume = score
        p.binaryMap = binaryMap
        p.scoreThreshold = overlay.score_threshold(p.densityThreshold)
        self.onShowOverlayButton()
        self.ui.reviewCollapsibleButton.collapsed = False
        self.ui.detectProgressBar.value = 100
        self.ui.detectStatusLabel.text = _("Done: {count} anomalous voxels at density threshold {tau:g}.").format(
            count=int(volumes.array_from_volume(binaryMap).sum()), tau=p.densityThreshold)

    # -- Review --------------------------------------------------------------------------------------------------

    def onShowOverlayButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot show the overlay."), waitCursor=True):
            self.logic.showOverlay(p.inputVolume, p.scoreVolume, p.binaryMap, p.scoreThreshold, p.overlayOpacity)
            self.ui.scoreWindowLevelWidget.setMRMLVolumeNode(p.scoreVolume)
            slicer.util.resetSliceViews()

    def onScoreVolumeChanged(self, node=None) -> None:
        self.ui.scoreWindowLevelWidget.setMRMLVolumeNode(node)

    def onScoreThresholdChanged(self, value) -> None:
        self.ui.thresholdInfoLabel.text = _("density threshold {tau:.3g}").format(tau=overlay.density_threshold(value))
        self._thresholdTimer.start()

    def updateBinaryMap(self) -> None:
        p = self._parameterNode
        if p is None or not p.scoreVolume:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot update the binary map."), waitCursor=True):
            binaryMap, count = self.logic.updateBinaryMap(p.scoreVolume, p.scoreThreshold, p.binaryMap)
            if p.binaryMap is not binaryMap:
                p.binaryMap = binaryMap
            overlay.set_display_threshold(p.scoreVolume, p.scoreThreshold)
            self.ui.thresholdInfoLabel.text = _("density threshold {tau:.3g}: {count} anomalous voxels").format(
                tau=overlay.density_threshold(p.scoreThreshold), count=count)

    def onOverlayOpacityChanged(self, value) -> None:
        p = self._parameterNode
        if p is not None and p.scoreVolume:
            overlay.set_overlay_opacity(slicer.mrmlScene, value, p.scoreVolume)

    # -- Export --------------------------------------------------------------------------------------------------

    def onExportButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot create the segmentation."), waitCursor=True):
            segmentation, table = self.logic.exportSegmentation(
                p.binaryMap, p.inputVolume, p.splitComponents, p.minimumRegionVolume)
            p.segmentation = segmentation
            p.statisticsTable = table
            self.ui.componentTableView.setMRMLTableNode(table)
            if not _isSet(p.segmentationFile):
                p.segmentationFile = self.logic.defaultSegmentationFile(segmentation, slicer.app.defaultScenePath)

    def onUpdateStatisticsButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot compute the statistics."), waitCursor=True):
            p.statisticsTable = self.logic.componentStatistics(p.segmentation, p.inputVolume, p.statisticsTable)
            self.ui.componentTableView.setMRMLTableNode(p.statisticsTable)

    def onSaveSegmentationButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot save the segmentation."), waitCursor=True):
            path = self.logic.saveSegmentation(p.segmentation, p.segmentationFile)
            self._log(_("Saved {path}").format(path=path))
            slicer.util.showStatusMessage(_("Saved {path}").format(path=path), 5000)

    def onSaveDicomSegButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot save the DICOM SEG."), waitCursor=True):
            path = self.logic.saveDicomSegmentation(p.segmentation, p.inputVolume, p.segmentationFile)
            self._log(_("Saved {path}").format(path=path))
            slicer.util.showStatusMessage(_("Saved {path}").format(path=path), 5000)

    # -- Train ---------------------------------------------------------------------------------------------------

    def onTrainButton(self) -> None:
        p = self._parameterNode
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start training."), waitCursor=True):
            self._startTraining(self.logic.startTraining(self.logic.trainingSettings(p)))

    def onResumeButton(self) -> None:
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot resume training."), waitCursor=True):
            self._startTraining(self.logic.resumeTraining(self._parameterNode.trainingOutput))

    def _startTraining(self, job) -> None:
        self._trainingJob = job
        self._log(" ".join(job.argv))
        self.ui.trainProgressBar.value = 0
        self.ui.trainStatusLabel.text = _("Training started.")
        self._jobTimer.start()
        self._updateButtonStates()

    def onCancelTrainButton(self) -> None:
        if self._trainingJob is not None:
            self.ui.trainStatusLabel.text = _("Cancelling...")
            self._trainingJob.cancel()
            self.onJobTimer()

    def _finishTraining(self) -> None:
        job, self._trainingJob = self._trainingJob, None
        self._updateButtonStates()
        p = self._parameterNode
        if job.state is jobs.JobState.SUCCEEDED:
            self.ui.trainProgressBar.value = 100
            self.ui.trainStatusLabel.text = _("Finished. {last}").format(last=workflow.training_progress_text(job))
            # The new run is ready for detection and for the iteration browser.
            if p is not None:
                p.runFolder = p.trainingOutput
                p.browserRunFolder = p.trainingOutput
        elif job.state is jobs.JobState.CANCELLED:
            self.ui.trainStatusLabel.text = _("Cancelled; finished iterations are kept. Resume continues the run.")
        else:
            message = _("Training failed: {error}").format(error=job.error_message)
            self.ui.trainStatusLabel.text = message
            slicer.util.errorDisplay(message, windowTitle=_("ILTM Anomaly"))

    # -- both jobs -----------------------------------------------------------------------------------------------

    def onJobTimer(self) -> None:
        if self._detection is not None:
            job = self._detection.job
            for event in job.poll():
                self._logEvent(event)
            self._showProgress(job, self.ui.detectProgressBar, self.ui.detectStatusLabel)
            if job.finished:
                self._finishDetection()
        if self._trainingJob is not None:
            job = self._trainingJob
            for event in job.poll():
                self._logEvent(event)
            self._showProgress(job, self.ui.trainProgressBar, self.ui.trainStatusLabel)
            if job.iterations:
                self.ui.trainStatusLabel.text = workflow.training_progress_text(job)
            if job.finished:
                self._finishTraining()
        if self._detection is None and self._trainingJob is None:
            self._jobTimer.stop()

    @staticmethod
    def _showProgress(job, progressBar, statusLabel) -> None:
        if job.fraction is not None:
            progressBar.value = int(round(100 * job.fraction))
        if job.message and not job.finished:
            statusLabel.text = job.message

    def _logEvent(self, event) -> None:
        kind = event.get("event")
        if kind in ("log", "text", "stderr"):
            self._log(event.get("message", ""))
        elif kind == "iteration":
            self._log(jobs.format_iteration(event))

    def _log(self, text) -> None:
        self.ui.logTextEdit.appendPlainText(str(text))
        logging.info(text)

    # -- Iterations ----------------------------------------------------------------------------------------------

    def onBrowserRunChanged(self, path=None) -> None:
        # This slot may run before the parameter node has the new path: take it from the signal when given.
        p = self._parameterNode
        folder = path if path is not None else (p.browserRunFolder if p is not None else None)
        self._browserRun = None
        self.ui.browserScanComboBox.clear()
        if not _isSet(folder):
            self.ui.browserStatusLabel.text = ""
            return
        try:
            run = runs.RunFolder(folder)
            iterations = run.mask_iterations()
            scans = run.scans()
            history = run.history()
        except PanelError as error:
            self.ui.browserStatusLabel.text = str(error)
            return
        self._browserRun = run
        for scan in scans:
            self.ui.browserScanComboBox.addItem(scan.id)
        self.ui.browserIterationSlider.maximum = iterations[-1] if iterations else 0
        self.ui.browserIterationLabel.text = str(self.ui.browserIterationSlider.value)
        state = history.get("stop_reason") or (_("finished") if history.get("finished") else _("in progress"))
        status = _("{scans} training scans, iterations {first}-{last} ({state}).").format(
            scans=len(scans), first=iterations[0] if iterations else "-", last=iterations[-1] if iterations else "-",
            state=state)
        if run.trained_iterations():  # the one a detection with this run uses unless told otherwise
            status += " " + _("Detection uses iteration {used}.").format(used=run.resolve_iteration(None))
        self.ui.browserStatusLabel.text = status

    def onBrowserIterationChanged(self, value) -> None:
        self.ui.browserIterationLabel.text = str(value)
        # Once a scan is shown, moving the slider shows the same scan's mask at the new iteration.
        if self.logic.browserNodes and self._browserRun is not None:
            self.onBrowserLoadButton()

    def onBrowserLoadButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot show this iteration."), waitCursor=True):
            if self._browserRun is None:
                raise PanelError(_("Choose a training run folder first."))
            volume, segmentation = self.logic.loadIteration(
                self._browserRun.root, self.ui.browserIterationSlider.value, self.ui.browserScanComboBox.currentText)
            slicer.util.setSliceViewerLayers(background=volume, foreground=None, label=None, fit=True)

    def onShowHistoryButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot plot the history."), waitCursor=True):
            if self._browserRun is None:
                raise PanelError(_("Choose a training run folder first."))
            plot = self.logic.plotHistory(self._browserRun.root)
            slicer.modules.plots.logic().ShowChartInLayout(plot.masked_tokens_chart)


#
# ILTMAnomalyLogic
#


class ILTMAnomalyLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable without it (from the Python console, a script or the self-test).

    The work itself is in ILTMAnomalyLib (MRML, no Qt) and in the ``iltm`` core (run as a child process).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # None runs "PythonSlicer -m iltm"; tests may point it at another program speaking the same protocol.
        self.cliCommand = None
        self.browserNodes = ()
        self._historyPlot = None

    def getParameterNode(self):
        return ILTMAnomalyParameterNode(super().getParameterNode())

    # -- dependencies -------------------------------------------------------------------------------------------

    @staticmethod
    def missingDependencies() -> list:
        """Packages the core needs that are not installed (checked without importing them)."""
        return dependencies.missing_requirements()

    @staticmethod
    def ensureDependencies(confirm) -> bool:
        """Install missing packages after ``confirm(message)`` returns True; False when the user declined."""
        return dependencies.install(confirm, log=logging.info)

    # -- detection ----------------------------------------------------------------------------------------------

    @staticmethod
    def detectionSettings(parameterNode) -> workflow.DetectionSettings:
        """The panel's detection options; 0 in the advanced fields means "the run's own value"."""
        p = parameterNode
        return workflow.DetectionSettings(
            iteration=p.iteration if p.iteration >= 0 else None,
            device=p.device,
            resampling_threshold=p.resamplingThreshold or None,
            samples=p.samples or None,
            dropout_passes=p.dropoutPasses or None,
            eps=p.eps or None,
            density_threshold=p.densityThreshold,
        )

    @staticmethod
    def defaultModel():
        """The demo model bundle shipped with the extension (trained on synthetic phantoms), or None."""
        return workflow.default_model()

    @staticmethod
    def loadSamplePET():
        """The synthetic PET of the Sample Data module, loaded into the scene (as its button does)."""
        import SampleData

        return SampleData.downloadSample(sampledata.SAMPLE_NAME)

    def startDetection(self, volumeNode, runFolder=None, settings=None) -> workflow.DetectionRun:
        """Check the inputs and start ``iltm detect`` in the background; poll ``result.job`` until it finishes.

        ``runFolder`` is a run folder or a model bundle; None = the demo model.
        """
        if runFolder is None:
            runFolder = self.defaultModel()
        return workflow.start_detection(volumeNode, runFolder, settings, command=self.cliCommand)

    @staticmethod
    def finishDetection(detection):
        """(score volume, binary map) once the job has ended; raises PanelError when it failed or was cancelled."""
        return workflow.finish_detection(slicer.mrmlScene, detection)

    def detect(self, volumeNode, runFolder=None, settings=None, timeout=None):
        """Detection from start to finish, blocking (scripts, self-test). Returns (score volume, binary map)."""
        detection = self.startDetection(volumeNode, runFolder, settings)
        if detection.job.wait(timeout=timeout) is jobs.JobState.RUNNING:
            detection.job.cancel(wait=True)
            detection.cleanup()
            raise PanelError(_("Detection took longer than {seconds} s and was stopped.").format(seconds=timeout))
        return self.finishDetection(detection)

    # -- review -------------------------------------------------------------------------------------------------

    @staticmethod
    def showOverlay(petVolume, scoreVolume, binaryMap, scoreThreshold, opacity) -> None:
        if not petVolume or not scoreVolume:
            raise PanelError(_("Select the PET volume and its anomaly score."))
        overlay.show_score_overlay(slicer.mrmlScene, petVolume, scoreVolume, scoreThreshold, opacity,
                                   binary_map=binaryMap)

    @staticmethod
    def updateBinaryMap(scoreVolume, scoreThreshold, binaryMap=None):
        """Binary map = score > threshold, in ``binaryMap`` (created when None). Returns (node, voxel count)."""
        name = scoreVolume.GetName().replace(" anomaly score", "") + " anomaly mask"
        return overlay.update_binary_map(slicer.mrmlScene, scoreVolume, scoreThreshold, binaryMap, name)

    # -- export -------------------------------------------------------------------------------------------------

    def exportSegmentation(self, binaryMap, petVolume, splitComponents=True, minimumRegionVolume=0.0):
        """Segmentation of the binary map on the PET's geometry, and its statistics table."""
        if not binaryMap or not petVolume:
            raise PanelError(_("Select the PET volume and run detection first."))
        name = slicer.mrmlScene.GenerateUniqueName(f"{petVolume.GetName()} anomalies")
        segmentation = segments.segmentation_from_labelmap(
            slicer.mrmlScene, binaryMap, petVolume, name,
            per_component=splitComponents, min_volume_ml=minimumRegionVolume, allow_empty=False)
        try:
            table = self.componentStatistics(segmentation, petVolume)
        except Exception:
            volumes.remove_node(slicer.mrmlScene, segmentation)
            raise
        return segmentation, table

    @staticmethod
    def componentStatistics(segmentationNode, petVolume, tableNode=None):
        if not segmentationNode or not petVolume:
            raise PanelError(_("Select the PET volume and a segmentation."))
        rows = segments.segment_statistics(segmentationNode, petVolume)
        return segments.statistics_table(slicer.mrmlScene, rows, f"{segmentationNode.GetName()} statistics", tableNode,
                                         unit=segments.pet_unit(petVolume))

    @staticmethod
    def defaultSegmentationFile(segmentationNode, folder) -> pathlib.Path:
        """``folder/<node name>.seg.nrrd`` with the name made safe ("3: PET WB" is no file name on Windows)."""
        return segments.default_segmentation_file(folder, segmentationNode)

    @staticmethod
    def saveSegmentation(segmentationNode, path):
        if not segmentationNode:
            raise PanelError(_("Create a segmentation first."))
        return segments.save_segmentation(segmentationNode, path)

    @staticmethod
    def saveDicomSegmentation(segmentationNode, petVolume, segmentationFile, fileForInstance=None):
        """Write the segments as a DICOM SEG referencing the PET's DICOM series, beside ``segmentationFile``
        (``<name>_seg.dcm``). ``fileForInstance`` finds a SOP instance's file (default: Slicer's DICOM database)."""
        if not segmentationNode or not petVolume:
            raise PanelError(_("Select the PET volume and create a segmentation first."))
        if fileForInstance is None:
            database = getattr(slicer, "dicomDatabase", None)
            if database is None or not database.isOpen:
                raise PanelError(_("Slicer's DICOM database is not open: open the DICOM module first."))
            fileForInstance = database.fileForInstance
        return segments.save_dicom_seg(segmentationNode, petVolume, segments.dicom_seg_file(segmentationFile),
                                       fileForInstance)

    # -- training -----------------------------------------------------------------------------------------------

    @staticmethod
    def trainingSettings(parameterNode) -> workflow.TrainingSettings:
        p = parameterNode
        return workflow.TrainingSettings(
            data_folder=p.trainingData if _isSet(p.trainingData) else None,
            run_folder=p.trainingOutput if _isSet(p.trainingOutput) else None,
            preset=p.preset,
            max_iterations=p.maxIterations if p.maxIterations >= 0 else None,
            device=p.trainingDevice,
        )

    def startTraining(self, settings) -> jobs.CliJob:
        return workflow.start_training(settings, command=self.cliCommand)

    def resumeTraining(self, runFolder) -> jobs.CliJob:
        return workflow.start_resume(runFolder, command=self.cliCommand)

    # -- iteration browser --------------------------------------------------------------------------------------

    def loadIteration(self, runFolder, iteration, scanId):
        """Show training scan ``scanId`` with the mask ILTM iteration ``iteration`` gave it (replaces the last one)."""
        volume, segmentation = runs.load_iteration_scan(
            slicer.mrmlScene, runs.RunFolder(runFolder), int(iteration), scanId, previous=self.browserNodes)
        self.browserNodes = (volume, segmentation)
        return volume, segmentation

    def plotHistory(self, runFolder):
        self._historyPlot = runs.history_plot(slicer.mrmlScene, runs.RunFolder(runFolder), previous=self._historyPlot)
        return self._historyPlot


#
# ILTMAnomalyTest
#


class ILTMAnomalyTest(ScriptedLoadableModuleTest):
    """Self-test: bad input leaves the scene alone; the try-out path (sample PET -> demo model -> overlay -> segments);
    synthetic PET -> tiny model -> detect -> segmentation."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ILTMAnomaly_bad_input()
        self.setUp()
        self.test_ILTMAnomaly_sample_data_with_demo_model()
        self.setUp()
        self.test_ILTMAnomaly_end_to_end()

    def _petVolume(self, name="PET"):
        import numpy as np

        zz, yy, xx = np.mgrid[:16, :32, :32]
        pet = (((xx - 16) / 13.0) ** 2 + ((yy - 16) / 11.0) ** 2 < 1).astype(np.float32)
        pet[((xx - 20) ** 2 + (yy - 14) ** 2 + (zz - 8) ** 2) < 9] = 6.0
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        ijkToRas = volumes.ijk_to_ras_from_itk((2, 2, 3), (0, 0, 0), np.eye(3).ravel())
        volumes.update_volume_from_array(node, pet, ijkToRas)
        return node

    def test_ILTMAnomaly_bad_input(self):
        self.delayDisplay("Bad input leaves the scene as it was")
        logic = ILTMAnomalyLogic()
        pet = self._petVolume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        emptyRun = tempfile.mkdtemp(prefix="ILTMAnomalyTest-")
        for volume, run, expected in ((None, emptyRun, "Select a PET volume"), (pet, "", "Select a trained run"),
                                      (pet, emptyRun, "missing pieces")):
            with self.assertRaises(PanelError) as context:
                logic.startDetection(volume, run)
            self.assertIn(expected, str(context.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Test passed")

    def test_ILTMAnomaly_sample_data_with_demo_model(self):
        """What a new user does first: Sample Data's synthetic PET, Detect with the default model, overlay, segments."""
        logic = ILTMAnomalyLogic()
        self.assertIsNotNone(logic.defaultModel(), "the extension ships its demo model")
        self.assertIn(logic.defaultModel().name, runs.open_model(logic.defaultModel()).description())
        missing = logic.missingDependencies()
        if missing:
            self.delayDisplay("Skipping the demo-model test: missing " + ", ".join(missing))
            return
        self.delayDisplay("Loading the synthetic PET from Sample Data")
        pet = logic.loadSamplePET()
        self.assertEqual(pet.GetName(), sampledata.SAMPLE_NAME)

        self.delayDisplay("Detecting with the demo model (the panel's default)")
        parameterNode = logic.getParameterNode()
        score, binaryMap = logic.detect(pet, None, logic.detectionSettings(parameterNode), timeout=600)
        self.assertTrue(volumes.same_geometry(score, pet, tolerance=1e-6))
        count = int(volumes.array_from_volume(binaryMap).sum())
        self.assertGreater(count, 0, "the demo model finds the phantom's lesions at the default threshold")

        self.delayDisplay("Overlay and segments")
        logic.showOverlay(pet, score, binaryMap, parameterNode.scoreThreshold, parameterNode.overlayOpacity)
        segmentation, table = logic.exportSegmentation(binaryMap, pet)
        segmentCount = segmentation.GetSegmentation().GetNumberOfSegments()
        self.assertGreater(segmentCount, 0)
        self.assertEqual(table.GetNumberOfRows(), segmentCount)
        self.delayDisplay("Test passed")

    def test_ILTMAnomaly_end_to_end(self):
        logic = ILTMAnomalyLogic()
        missing = logic.missingDependencies()
        if missing:
            # A test must not install packages; run it again after the panel installed them.
            self.delayDisplay("Skipping the end-to-end test: missing " + ", ".join(missing))
            return
        work = pathlib.Path(tempfile.mkdtemp(prefix="ILTMAnomalyTest-"))

        # The plumbing is under test, not the model: a few tiny scans and a few epochs keep this to a minute.
        self.delayDisplay("Synthesising a small PET cohort (all scans with lesions)")
        synth = jobs.CliJob(["synth", "--out", str(work / "data"), "--dims", "3", "--n", "3",
                             "--size", "24", "20", "16", "--anomalous-fraction", "1", "--seed", "0"],
                            command=logic.cliCommand).start()
        self.assertEqual(synth.wait(timeout=600), jobs.JobState.SUCCEEDED, synth.error_message)

        self.delayDisplay("Training a tiny model (one ILTM iteration)")
        quick = ["--set", "vqvae.epochs=2", "--set", "transformer.epochs=2", "--set", "detection.samples=2",
                 "--set", "detection.dropout_passes=1", "--set", "data.augment=false"]
        training = logic.startTraining(workflow.TrainingSettings(
            data_folder=work / "data", run_folder=work / "run", preset="tiny", max_iterations=1, device="cpu",
            extra_args=quick))
        self.assertEqual(training.wait(timeout=1800), jobs.JobState.SUCCEEDED, training.error_message)
        self.assertEqual([e["iteration"] for e in training.iterations], [0, 1])

        self.delayDisplay("Detecting anomalies in a synthetic PET")
        scan = sorted((work / "data" / "images").glob("*.nii.gz"))[0]
        pet = volumes.read_volume(slicer.mrmlScene, scan, "PET")
        settings = workflow.DetectionSettings(device="cpu", samples=4, dropout_passes=1)
        score, binaryMap = logic.detect(pet, work / "run", settings, timeout=900)
        self.assertTrue(volumes.same_geometry(score, pet, tolerance=1e-6))

        self.delayDisplay("Segmentation from the highest scores")
        import numpy as np

        threshold = float(np.percentile(volumes.array_from_volume(score), 99.5))
        binaryMap, count = logic.updateBinaryMap(score, threshold, binaryMap)
        self.assertGreater(count, 0)
        logic.showOverlay(pet, score, binaryMap, threshold, 0.5)
        segmentation, table = logic.exportSegmentation(binaryMap, pet)
        segmentCount = segmentation.GetSegmentation().GetNumberOfSegments()
        self.assertGreater(segmentCount, 0)
        self.assertEqual(table.GetNumberOfRows(), segmentCount)
        path = logic.saveSegmentation(segmentation, work / "anomalies.seg.nrrd")
        self.assertTrue(os.path.isfile(path))

        self.delayDisplay("Iteration browser")
        scanId = runs.RunFolder(work / "run").scans()[0].id
        volume, masks = logic.loadIteration(work / "run", 1, scanId)
        self.assertEqual(masks.GetSegmentation().GetNumberOfSegments(), 1)
        plot = logic.plotHistory(work / "run")
        self.assertEqual(plot.table.GetNumberOfRows(), 2)
        self.delayDisplay("Test passed")
