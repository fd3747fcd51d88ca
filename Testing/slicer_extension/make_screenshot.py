"""Render the extension's screenshot with Slicer's own slice logic (slicer-core wheel, off-screen OpenGL):
a synthetic PET with the ILTM anomaly score in PET-Heat colours over it and the exported segments' outlines,
in an axial and a coronal view through the largest detected region.

    python Testing/slicer_extension/make_screenshot.py                  # synthesise + train a tiny run (minutes)
    python Testing/slicer_extension/make_screenshot.py --run RUN [--scan PET]   # use a trained 3D run

Writes Resources/Screenshots/ILTMAnomaly-overlay.png (or --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ILTMAnomaly"))

from ILTMAnomalyLib import jobs, overlay, segments, volumes, workflow  # noqa: E402
from ILTMAnomalyLib.rendering import CoreApplication, SliceRenderer, write_png  # noqa: E402

DEFAULT_OUT = REPO / "Resources" / "Screenshots" / "ILTMAnomaly-overlay.png"


def cli(args: list[str], timeout: float = 3600) -> jobs.CliJob:
    print("iltm", " ".join(args), flush=True)
    job = jobs.CliJob(args).start()
    while job.wait(timeout=30) is jobs.JobState.RUNNING and timeout > 0:
        timeout -= 30
        print(f"  {job.message}", flush=True)
    if job.state is not jobs.JobState.SUCCEEDED:
        job.cancel(wait=True)
        raise SystemExit(f"iltm {args[0]} failed: {job.error_message}")
    return job


def prepare(work: Path, run: Path | None) -> tuple[Path, Path]:
    """(run folder, held-out scan): trains a tiny run when none is given."""
    if run is None:
        cli(["synth", "--out", str(work / "train"), "--dims", "3", "--n", "8", "--anomalous-fraction", "1",
             "--seed", "0"])
        run = work / "run"
        cli(["train", "--data", str(work / "train"), "--out", str(run), "--preset", "tiny", "--max-iterations", "2"])
    cli(["synth", "--out", str(work / "test"), "--dims", "3", "--n", "1", "--anomalous-fraction", "1",
         "--seed", "11"])
    return run, sorted((work / "test" / "images").glob("*.nii.gz"))[0]


def render(run: Path, scan: Path, out: Path, size: int = 360) -> None:
    app = CoreApplication()
    scene = app.scene
    pet = volumes.read_volume(scene, scan, "PET")
    pet_array = volumes.array_from_volume(pet)
    display = pet.GetScalarVolumeDisplayNode()
    display.SetAutoWindowLevel(False)
    # Saturate the hottest 1 %: the body's faint uptake stays visible under the overlay.
    display.SetWindowLevelMinMax(0.0, float(np.percentile(pet_array, 99.0)))
    display.SetInterpolate(True)

    tau = overlay.DEFAULT_DENSITY_THRESHOLD
    detection = workflow.start_detection(pet, run, workflow.DetectionSettings(density_threshold=tau))
    print("iltm", " ".join(detection.job.args), flush=True)
    detection.job.wait(timeout=3600)
    score, binary_map = workflow.finish_detection(scene, detection)
    threshold = overlay.score_threshold(tau)
    print(f"{int(volumes.array_from_volume(binary_map).sum())} voxels with density < {tau}")

    segmentation = segments.segmentation_from_labelmap(scene, binary_map, pet, "PET anomalies", allow_empty=False)
    seg_display = segmentation.GetDisplayNode()
    seg_display.SetOpacity2DFill(0.0)
    seg_display.SetOpacity2DOutline(1.0)
    seg_display.SetSliceIntersectionThickness(2)
    rows = segments.segment_statistics(segmentation, pet)
    for row in rows[:5]:
        print(f"  {row['segment']}: {row['volume_ml']:.1f} mL, PET max {row['pet_max']:.2f}")

    # The views go through the hottest detected region, where the PET peaks.
    labels, _ = segments.segment_labels_on(segmentation, pet)
    hottest = max(range(1, labels.max() + 1), key=lambda label: pet_array[labels == label].max())
    k, j, i = np.unravel_index(np.argmax(np.where(labels == hottest, pet_array, -np.inf)), labels.shape)
    centre = volumes.get_ijk_to_ras(pet) @ np.array([i, j, k, 1.0])

    panels = []
    for name, orientation, axis in (("Red", "Axial", 2), ("Green", "Coronal", 1)):
        view = SliceRenderer(app, name, size=(size, size), orientation=orientation)
        view.composite_node.SetBackgroundVolumeID(pet.GetID())
        overlay.show_score_overlay(scene, pet, score, threshold, opacity=0.65)
        view.fit()
        view.set_slice_offset(float(centre[axis]))
        panels.append(view.render())
    gap = np.full((size, 6, 3), 40, np.uint8)
    write_png(np.concatenate([panels[0], gap, panels[1]], axis=1), out)
    print(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained 3D run folder (default: train a tiny one)")
    parser.add_argument("--scan", type=Path, help="PET to show (default: a new synthetic scan with lesions)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, help="folder for the synthetic data (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ILTMAnomaly-screenshot-"))
    run, scan = prepare(work, args.run)
    render(run, args.scan or scan, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
