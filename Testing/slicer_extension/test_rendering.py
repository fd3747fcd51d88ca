"""Slice views drawn by Slicer's own vtkMRMLSliceLogic: the heat overlay blended over the PET, segment outlines.

The blended slice (background + foreground + label layers) is computed by the slice logic on the CPU, so those
checks always run. Drawing the view with its displayable managers (segment outlines) needs an OpenGL context;
VTK's wheel provides one off-screen through EGL or OSMesa when the system has either library. A subprocess
probes that first (a missing library would crash, not raise), and only the outline test is skipped without it.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import slicer
from ILTMAnomalyLib import overlay, segments, volumes
from ILTMAnomalyLib.rendering import SliceRenderer

from mrml_helpers import phantom_pet

PROBE = """
import vtk
window = vtk.vtkRenderWindow(); window.SetOffScreenRendering(1); window.SetSize(8, 8)
renderer = vtk.vtkRenderer(); renderer.SetBackground(1, 0, 0); window.AddRenderer(renderer); window.Render()
grab = vtk.vtkWindowToImageFilter(); grab.SetInput(window); grab.Update()
assert grab.GetOutput().GetPointData().GetScalars().GetTuple(0)[0] == 255
print(window.GetClassName())
"""


@pytest.fixture(scope="module")
def opengl():
    """The off-screen render window class, or a skip naming why there is none."""
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or [f"exit code {probe.returncode}"]
        pytest.skip(f"no off-screen OpenGL context for VTK here (EGL/OSMesa missing?): {tail[0]}")
    return probe.stdout.strip()


@pytest.fixture
def scene_with_pet(app):
    """An axis-aligned anisotropic PET phantom (so image rows map simply onto view rows) and its score."""
    pet, lesions = phantom_pet(shape=(12, 40, 48))
    ijk_to_ras = volumes.ijk_to_ras_from_itk((2.0, 2.0, 4.0), (0.0, 0.0, 0.0), np.eye(3).reshape(-1))
    pet_node = slicer.vtkMRMLScalarVolumeNode()
    pet_node.SetName("PET")
    volumes.update_volume_from_array(pet_node, pet, ijk_to_ras)
    app.scene.AddNode(pet_node)
    pet_node.CreateDefaultDisplayNodes()
    pet_display = pet_node.GetScalarVolumeDisplayNode()
    pet_display.SetAutoWindowLevel(False)
    pet_display.SetWindowLevelMinMax(0.0, 10.0)
    score_node = slicer.vtkMRMLScalarVolumeNode()
    score_node.SetName("PET anomaly score")
    volumes.update_volume_from_array(score_node, np.where(lesions > 0, 10.0, 1.0).astype(np.float32), ijk_to_ras)
    app.scene.AddNode(score_node)
    return app, pet_node, score_node, lesions


def _view(app, pet_node):
    view = SliceRenderer(app, "Red", size=(192, 160))
    view.composite_node.SetBackgroundVolumeID(pet_node.GetID())
    view.fit()
    # Through the lesions' centre slice (k = 6): offset = z of that slice in RAS.
    view.set_slice_offset(volumes.get_ijk_to_ras(pet_node)[2, 3] + 6 * 4.0)
    return view


def test_heat_overlay_is_blended_over_the_pet(scene_with_pet):
    app, pet_node, score_node, _ = scene_with_pet
    view = _view(app, pet_node)
    pet_only = view.blended_slice()[..., :3].astype(int)
    assert np.all(pet_only[..., 0] == pet_only[..., 1]) and np.all(pet_only[..., 1] == pet_only[..., 2])

    threshold = overlay.score_threshold(0.005)
    overlay.show_score_overlay(app.scene, pet_node, score_node, threshold, opacity=1.0, window=(0.0, 12.0))
    heat_only = view.blended_slice()[..., :3].astype(int)
    overlay.set_overlay_opacity(app.scene, 0.5)
    blended = view.blended_slice()[..., :3].astype(int)

    lesion = np.any(heat_only != pet_only, axis=-1)
    assert 50 < lesion.sum() < 0.2 * lesion.size          # the two lesions, nothing else
    # Below the threshold the overlay is transparent: the PET shows unchanged.
    np.testing.assert_array_equal(blended[~lesion], pet_only[~lesion])
    # Over the lesions: PET-Heat colours (red >= green >= blue, clearly not grey) ...
    hot = heat_only[lesion]
    assert np.all(hot[:, 0] >= hot[:, 1]) and np.all(hot[:, 1] >= hot[:, 2])
    assert np.mean(hot[:, 0] - hot[:, 2]) > 40
    # ... mixed half and half with the PET at opacity 0.5.
    expected = 0.5 * pet_only[lesion] + 0.5 * heat_only[lesion]
    assert np.abs(blended[lesion] - expected).max() <= 2
    view.close()


def test_rendered_view_shows_overlay_and_segment_outline(scene_with_pet, opengl, tmp_path):
    app, pet_node, score_node, lesions = scene_with_pet
    view = _view(app, pet_node)
    overlay.show_score_overlay(app.scene, pet_node, score_node, overlay.score_threshold(0.005), opacity=0.5,
                               window=(0.0, 12.0))
    plain = view.render().astype(int)
    blended = view.blended_slice()[..., :3].astype(int)
    # The view shows the slice logic's blend as it is (the 2D actor maps 0..255 straight through).
    assert plain.shape == blended.shape
    assert np.abs(plain - blended).max() <= 1

    segmentation = segments.segmentation_from_mask(app.scene, lesions > 0, pet_node, "PET anomalies")
    display = segmentation.GetDisplayNode()
    display.SetOpacity2DFill(0.0)
    display.SetOpacity2DOutline(1.0)
    outlined = view.render().astype(int)
    changed = np.any(outlined != plain, axis=-1)
    assert changed.sum() > 20
    # Outline pixels carry the segments' colours (cyan for "Anomaly 1", green for "Anomaly 2").
    colours = {tuple(np.round(255 * np.array(c)).astype(int)) for c in segments.SEGMENT_COLORS[:2]}
    outline = outlined[changed]
    near = [min(np.abs(np.array(c) - px).max() for c in colours) for px in outline]
    assert np.median(near) <= 40
    # ... and they sit on the lesions' borders, not elsewhere in the view.
    lesion_pixels = np.any(blended != _pet_only(view), axis=-1)
    rows, cols = np.nonzero(changed)
    lesion_rows, lesion_cols = np.nonzero(lesion_pixels)
    assert rows.min() >= lesion_rows.min() - 3 and rows.max() <= lesion_rows.max() + 3
    assert cols.min() >= lesion_cols.min() - 3 and cols.max() <= lesion_cols.max() + 3
    view.save_png(tmp_path / "view.png")
    assert (tmp_path / "view.png").stat().st_size > 1000
    view.close()


def _pet_only(view):
    composite = view.composite_node
    foreground = composite.GetForegroundVolumeID()
    composite.SetForegroundVolumeID(None)
    pixels = view.blended_slice()[..., :3].astype(int)
    composite.SetForegroundVolumeID(foreground)
    return pixels
