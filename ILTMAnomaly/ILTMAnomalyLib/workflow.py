"""Detection and training as the panel runs them: check the inputs, start the CLI, load what it wrote.

Every check that can fail runs before the child process starts, with a message that says what to change;
results enter the scene only when every file was read (see :func:`load_detection_results`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from iltm.layout import MASK_SUFFIX, SCORE_SUFFIX, RunLayout

from . import PanelError, jobs, overlay, volumes
from .runs import RunFolder, open_model

# The demo model shipped with the extension (iltm_bench/make_demo_model.py): synthetic phantoms, not patients.
DEMO_MODEL = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "iltm-demo-synthetic-pet-tiny.zip"

# The input is written under this stem, so the outputs are <stem>_score.nii.gz and <stem>_mask.nii.gz.
INPUT_STEM = "input"
DEVICES = ("auto", "cuda", "cpu")
PRESETS = ("tiny", "small", "paper")


@dataclass
class DetectionSettings:
    """Detection options; None means "the run's own value" (the flag is not passed).

    Args:
        iteration: ILTM iteration whose Transformer to use; None or negative = the last trained one.
        device: "auto", "cuda" or "cpu".
        resampling_threshold: t, tokens with p < t are resampled.
        samples: S healed samples.
        dropout_passes: D dropout decodes per sample.
        eps: KDE bandwidth regulariser (intensity units of the model's input scaling).
        density_threshold: tau; voxels with density < tau are in the binary map.
        seed: seed of the token resampling.
    """

    iteration: Optional[int] = None
    device: str = "auto"
    resampling_threshold: Optional[float] = None
    samples: Optional[int] = None
    dropout_passes: Optional[int] = None
    eps: Optional[float] = None
    density_threshold: Optional[float] = overlay.DEFAULT_DENSITY_THRESHOLD
    seed: Optional[int] = None


def default_model() -> Optional[Path]:
    """The demo model bundle when the extension ships it, else None."""
    return DEMO_MODEL if DEMO_MODEL.is_file() else None


def check_detection_inputs(volume_node, run_folder, iteration: Optional[int] = None) -> tuple[RunFolder, int]:
    """Every reason detection would fail before it starts; returns the model (a run folder or a model bundle) and
    the iteration to use."""
    problem = volumes.volume_problem(volume_node)
    if problem:
        raise PanelError(problem)
    run = open_model(run_folder)
    run.check_complete()
    resolved = run.resolve_iteration(iteration)
    model_dims = run.spatial_dims
    image_dims = volumes.volume_spatial_dims(volume_node)
    if model_dims is not None and model_dims != image_dims:
        raise PanelError(f"The model in {run.root} was trained on {model_dims}D images but "
                         f"'{volume_node.GetName()}' is {image_dims}D. Choose a {model_dims}D image or a model "
                         f"trained on {image_dims}D scans.")
    return run, resolved


def detection_args(run: RunFolder, input_path, out_dir, settings: DetectionSettings) -> list[str]:
    args = ["detect", "--run", str(run.root), "--input", str(input_path), "--out", str(out_dir)]
    if settings.iteration is not None and settings.iteration >= 0:
        args += ["--iteration", str(int(settings.iteration))]
    if settings.device not in DEVICES:
        raise PanelError(f"Unknown device '{settings.device}'; choose one of {', '.join(DEVICES)}.")
    args += ["--device", settings.device]
    for flag, value in (("--resampling-threshold", settings.resampling_threshold), ("--samples", settings.samples),
                        ("--dropout-passes", settings.dropout_passes), ("--eps", settings.eps),
                        ("--density-threshold", settings.density_threshold), ("--seed", settings.seed)):
        if value is not None:
            args += [flag, repr(value) if isinstance(value, float) else str(int(value))]
    return args


@dataclass
class DetectionRun:
    """A detection in progress: its job, its scratch folder, and the PET it belongs to."""

    job: jobs.CliJob
    volume_node: object
    run: RunFolder
    iteration: int
    work_dir: Path
    settings: DetectionSettings
    keep_work_dir: bool = False

    @property
    def out_dir(self) -> Path:
        return self.work_dir / "out"

    def cleanup(self) -> None:
        if not self.keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def start_detection(volume_node, run_folder, settings: Optional[DetectionSettings] = None,
                    command: Optional[list[str]] = None, work_dir=None) -> DetectionRun:
    """Check inputs, write the PET to a scratch NIfTI, start ``iltm detect`` in the background."""
    settings = settings or DetectionSettings()
    run, iteration = check_detection_inputs(volume_node, run_folder, settings.iteration)
    keep = work_dir is not None
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ILTMAnomaly-detect-"))
    try:
        # Uncompressed: a scratch file read once, and writing it should not keep the user waiting.
        input_path = volumes.write_volume(volume_node, work_dir / f"{INPUT_STEM}.nii", compress=False)
        args = detection_args(run, input_path, work_dir / "out", settings)
    except Exception:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise
    job = jobs.CliJob(args, command=command)
    job.start()
    return DetectionRun(job, volume_node, run, iteration, work_dir, settings, keep_work_dir=keep)


def result_paths(out_dir, stem: str = INPUT_STEM) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / f"{stem}{SCORE_SUFFIX}", out_dir / f"{stem}{MASK_SUFFIX}"


def load_detection_results(scene, pet_volume, out_dir, stem: str = INPUT_STEM, density_threshold=None):
    """Load ``<stem>_score`` and ``<stem>_mask`` as "<PET> anomaly score" / "<PET> anomaly mask" on the PET grid.

    Both files are read and checked against the PET's grid first; only then do the nodes stay in the scene.

    Returns:
        (score volume node, mask label map node).
    """
    score_path, mask_path = result_paths(out_dir, stem)
    for path in (score_path, mask_path):
        if not path.is_file():
            raise PanelError(f"iltm finished but did not write {path.name}.")
    name = pet_volume.GetName()
    score = volumes.read_volume(None, score_path, f"{name} anomaly score")
    mask = volumes.read_volume(None, mask_path, f"{name} anomaly mask", labelmap=True)
    for node in (score, mask):
        if not volumes.same_geometry(node, pet_volume, tolerance=1e-3):
            raise PanelError(f"{node.GetName()} does not lie on the grid of '{name}' "
                             "(the core must write results on the input's geometry).")
        # Files store geometry in float32: take the PET's exact matrix so the layers align to the bit.
        volumes.set_ijk_to_ras(node, volumes.get_ijk_to_ras(pet_volume))
    if score.GetImageData().GetNumberOfScalarComponents() != 1:
        raise PanelError(f"{score_path.name} has more than one value per voxel.")
    volumes.add_volume(scene, score)
    volumes.add_volume(scene, mask)
    # The CLI saw the PET's own grid (files carry no parent transform): results go under the PET's transform.
    volumes.follow_transform(score, pet_volume)
    volumes.follow_transform(mask, pet_volume)
    if density_threshold:
        mask.SetAttribute("ILTMAnomaly.DensityThreshold", repr(float(density_threshold)))
    score.SetAttribute("ILTMAnomaly.Source", pet_volume.GetID() or "")
    return score, mask


def finish_detection(scene, detection: DetectionRun):
    """After the job ended: load the results (success) or raise its one-line error; scratch files go either way."""
    try:
        if detection.job.state is jobs.JobState.CANCELLED:
            raise PanelError("Detection was cancelled; the scene is unchanged.")
        if detection.job.state is not jobs.JobState.SUCCEEDED:
            raise PanelError(f"Detection failed: {detection.job.error_message or 'unknown error'}")
        return load_detection_results(scene, detection.volume_node, detection.out_dir,
                                      density_threshold=detection.settings.density_threshold)
    finally:
        detection.cleanup()


def shut_down(detection: Optional[DetectionRun], training_job: Optional[jobs.CliJob], stop_training) -> None:
    """What the panel does when it goes away (Slicer closes, the module is reloaded).

    A detection is cancelled and waited for (a second or two) so its scratch folder, which holds a copy of the
    PET, can be removed. A training is never stopped without asking: ``stop_training()`` decides (True: the
    process tree is stopped, finished iterations stay and Resume continues the run; False: it is left running).
    """
    if detection is not None:
        if not detection.job.finished:
            detection.job.cancel(grace_seconds=1.0, wait=True)
        detection.cleanup()
    if training_job is not None and not training_job.finished and stop_training():
        training_job.cancel(grace_seconds=2.0, wait=True)


# -- training -------------------------------------------------------------------------------------------------

@dataclass
class TrainingSettings:
    """``iltm train`` options the panel offers.

    Args:
        data_folder: folder of training scans (any format SimpleITK reads), or ``images/`` + ``labels/``.
        run_folder: output run folder (must not hold another run).
        preset: "tiny", "small" or "paper".
        max_iterations: ILTM iterations after iteration 0; None = the preset's.
        seed: random seed; None = the preset's.
        device: "auto", "cuda" or "cpu".
    """

    data_folder: Optional[Path] = None
    run_folder: Optional[Path] = None
    preset: str = "small"
    max_iterations: Optional[int] = None
    seed: Optional[int] = None
    device: str = "auto"
    extra_args: list[str] = field(default_factory=list)


def _is_set(path) -> bool:
    return path is not None and str(path) not in ("", ".")


def training_args(settings: TrainingSettings) -> list[str]:
    """Check the folders and build ``iltm train --data ... --out ...``."""
    if not _is_set(settings.data_folder):
        raise PanelError("Choose the folder of training scans first.")
    if not _is_set(settings.run_folder):
        raise PanelError("Choose an output folder for the training run first.")
    data, out = Path(settings.data_folder), Path(settings.run_folder)
    if not data.exists():
        raise PanelError(f"The training data {data} does not exist.")
    if out.exists() and any(out.iterdir()):
        if RunLayout(out).config_path.is_file():
            raise PanelError(f"{out} already holds a training run: press Resume to continue it, or choose an "
                             "empty output folder.")
        raise PanelError(f"The output folder {out} is not empty; choose an empty or new folder.")
    if settings.preset not in PRESETS:
        raise PanelError(f"Unknown preset '{settings.preset}'; choose one of {', '.join(PRESETS)}.")
    args = ["train", "--data", str(data), "--out", str(out), "--preset", settings.preset]
    if settings.max_iterations is not None and settings.max_iterations >= 0:
        args += ["--max-iterations", str(int(settings.max_iterations))]
    if settings.seed is not None:
        args += ["--seed", str(int(settings.seed))]
    if settings.device and settings.device != "auto":
        args += ["--device", settings.device]
    return args + list(settings.extra_args)


def resume_args(run_folder) -> list[str]:
    if not _is_set(run_folder):
        raise PanelError("Choose the run folder to resume first.")
    run = RunLayout(run_folder)
    if not run.config_path.is_file() or not run.manifest_path.is_file():
        raise PanelError(f"{run.root} is not a training run (config.yaml or manifest.json is missing): nothing to resume.")
    return ["train", "--resume", str(run.root)]


def start_training(settings: TrainingSettings, command: Optional[list[str]] = None) -> jobs.CliJob:
    return jobs.CliJob(training_args(settings), command=command).start()


def start_resume(run_folder, command: Optional[list[str]] = None) -> jobs.CliJob:
    return jobs.CliJob(resume_args(run_folder), command=command).start()


def training_progress_text(job: jobs.CliJob) -> str:
    """One line for the panel: the latest ILTM iteration and the current stage."""
    parts = []
    if job.iterations:
        parts.append(jobs.format_iteration(job.iterations[-1]))
    if job.message:
        parts.append(job.message)
    return " | ".join(parts) if parts else job.state.value
