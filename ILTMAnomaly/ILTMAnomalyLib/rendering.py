"""Slice views without Slicer's GUI: a scene with the application logics, and an off-screen slice renderer.

Inside Slicer the application provides all of this and the panel never calls it. Outside (the ``slicer-core``
wheel: tests, the screenshot script) :class:`CoreApplication` sets up what ``qSlicerCoreApplication`` would:
application logic, default colour nodes (PET-Heat among them), the segmentations logic and slice orientation
presets. :class:`SliceRenderer` then draws one slice view exactly as Slicer composes it:
``vtkMRMLSliceLogic`` reslices and blends the background, foreground and label layers, and the segmentation
displayable manager draws segment outlines on top. Rendering needs an OpenGL context: on a machine without a
display, VTK's EGL or OSMesa off-screen back end provides it.
"""

from __future__ import annotations

import os

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer


class CoreApplication:
    """The logics ``qSlicerCoreApplication`` would make, for a scene outside Slicer.

    Args:
        scene: an existing scene, or None for a new one.
    """

    def __init__(self, scene=None):
        self.scene = scene or slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())
        # The colour logic adds Slicer's default colour nodes (PET-Heat among them) when it gets the scene.
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(self.app_logic)
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLScene(self.scene)
        self.segmentations_logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic("Segmentations", self.segmentations_logic)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)


class SliceRenderer:
    """One off-screen slice view ("Red", "Yellow" or "Green") of a :class:`CoreApplication`'s scene.

    Args:
        app: the application (scene + logics).
        name: slice view name; its slice node and slice composite node are created in the scene.
        size: (width, height) in pixels.
        orientation: "Axial", "Sagittal" or "Coronal".
    """

    DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)

    def __init__(self, app: CoreApplication, name: str = "Red", size=(256, 256), orientation: str = "Axial"):
        self.app = app
        self.size = tuple(int(s) for s in size)
        self.render_window = vtk.vtkRenderWindow()
        self.render_window.SetOffScreenRendering(True)
        self.render_window.SetSize(*self.size)
        self.render_window.SetMultiSamples(0)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.render_window.AddRenderer(self.renderer)
        # Displayable managers reach the interactor through the window; a generic one needs no display server.
        self.interactor = vtk.vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)
        self.interactor.Initialize()

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for manager in self.DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app.app_logic)
        self.logic.SetMRMLScene(app.scene)
        app.app_logic.GetSliceLogics().AddItem(self.logic)
        self.slice_node = self.logic.AddSliceNode(name)
        self.slice_node.SetOrientation(orientation)
        self.managers.SetMRMLDisplayableNode(self.slice_node)

        # Slicer draws the blended slice with a 2D image actor (in ctkVTKSliceView); this is the same, minus Qt.
        self.image_mapper = vtk.vtkImageMapper()
        self.image_mapper.SetColorWindow(255)
        self.image_mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(self.image_mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image_actor)
        self.logic.ResizeSliceNode(*self.size)

    @property
    def composite_node(self):
        return self.logic.GetSliceCompositeNode()

    def fit(self) -> None:
        """Fit the field of view to the background volume and snap to a voxel slice."""
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()
        self.logic.SnapSliceOffsetToIJK()

    def set_slice_offset(self, offset_mm: float) -> None:
        self.logic.SetSliceOffset(float(offset_mm))

    def blended_slice(self) -> np.ndarray:
        """The slice logic's blended RGBA image (before any OpenGL): ``(height, width, 4)`` uint8, row 0 at top."""
        connection = self.logic.GetImageDataConnection()
        producer = connection.GetProducer()
        producer.Update()
        image = producer.GetOutputDataObject(connection.GetIndex())
        return _image_to_array(image)

    def render(self) -> np.ndarray:
        """Render the view (slice + displayable managers) and return its pixels, ``(height, width, 3)`` uint8."""
        self.image_mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.render_window.Render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(self.render_window)
        grabber.SetInputBufferTypeToRGB()
        grabber.ReadFrontBufferOff()
        grabber.Update()
        return _image_to_array(grabber.GetOutput())

    def save_png(self, path) -> None:
        """Render and write the view to a PNG file."""
        pixels = self.render()
        write_png(pixels, path)

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.app.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.render_window.Finalize()


def _image_to_array(image) -> np.ndarray:
    width, height, _ = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars).reshape(height, width, components)
    # VTK images start at the bottom row; flip so row 0 is the top of the view, as in a screenshot.
    return array[::-1].copy()


def write_png(pixels: np.ndarray, path) -> None:
    """Write a ``(height, width, 3|4)`` uint8 array as PNG with VTK's writer (no imaging package needed)."""
    pixels = np.ascontiguousarray(pixels[::-1])
    height, width, components = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(pixels.reshape(-1, components), deep=1))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(os.fspath(path))
    writer.SetInputData(image)
    writer.Write()
