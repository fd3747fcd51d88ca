"""The ``iltm`` command line: synth, train, detect, lesions, evaluate, report, demo, suv, export.

Bad input never ends in a traceback: an :class:`~iltm.errors.InputError` becomes one line on stderr
(``iltm: error: <file>: <problem>``) and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from importlib.metadata import distributions
from pathlib import Path

from .errors import InputError, printable

EXAMPLES = {
    "synth": ("examples:\n  iltm synth --out cohort --dims 3 --n 40 --anomalous-fraction 1.0 --seed 0\n"
              "  iltm synth --out cohort --dims 3 --n 12 --dicom   # also cohort/dicom/<id>/, DICOM PET in Bq/mL"),
    "train": ("examples:\n  iltm train --data cohort --out run --preset tiny\n"
              "  iltm train --data scans.csv --out run --preset small --max-iterations 4 --set detection.samples=30\n"
              "  iltm train --resume run\n"
              "  iltm train --resume run --full-fit 0   # iteration 0's full model too, for detect --iteration 0\n"
              "  torchrun --nproc_per_node 4 -m iltm train --data cohort --out run --preset paper"),
    "detect": ("examples:\n  iltm detect --run run --input scan.nii.gz --out results\n"
               "  iltm detect --run model.zip --input scan.nii.gz --out results\n"
               "  iltm detect --run run --input cohort/images --out results --iteration 0 --device cpu\n"
               "  iltm detect --run run --input dicom/PET_series --out results --lesions --dicom-seg --split-lesions\n"
               "  iltm detect --run run --input cohort/images --out results --resume   # after an interruption\n"
               "  torchrun --nproc_per_node 4 -m iltm -- detect --run run --input cohort/images --out results"),
    "export": ("examples:\n  iltm export run --out model.zip\n"
               "  iltm export run --out model-it0.zip --iteration 0 --units SUV"),
    "lesions": ("examples:\n  iltm lesions --pet suv.nii.gz --mask results/p1_mask.nii.gz --out p1_lesions.csv\n"
                "  iltm lesions --pet dicom/PET_series --mask m.nii.gz --score results/p1_score.nii.gz "
                "--out p1.csv --units BQML"),
    "evaluate": "example:\n  iltm evaluate --scores results --labels cohort/labels --out results/metrics.json",
    "report": "example:\n  iltm report run",
    "demo": "example:\n  iltm demo --out iltm_demo",
    "suv": ("examples:\n  iltm suv dicom/PET_WB --out pet_suv.nii.gz\n"
            "  iltm suv dicom/PET_WB --out pet_suv.nii.gz --weight 72.5 --dose 350 --injection-time 08:41:00\n"
            "train and detect on DICOM PET series in SUV (clip_value is then SUV):\n"
            "  iltm train --data dicom_series_folders/ --out run --set data.units=suv --set data.clip_value=15"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iltm", description="Iterative Latent Token Masking: anomaly detection trained on contaminated scans.",
        epilog="Run 'iltm <command> --help' for a command's options and examples.")
    parser.add_argument("--version", action="version", version=f"iltm {__import__('iltm').__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                        help="progress display: tqdm bars, JSON lines on stdout (for programs), or none")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=[common], epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("synth", "Write a synthetic PET-like cohort (images, lesion labels, manifest).")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3, help="2D slices or 3D volumes (default 3)")
    p.add_argument("--n", type=int, default=20, help="number of subjects (default 20)")
    p.add_argument("--anomalous-fraction", type=float, default=1.0, help="fraction of subjects with lesions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs="+", help="image size in voxels (x y [z]); default per --dims")
    p.add_argument("--dicom", action="store_true",
                   help="also write each subject as a DICOM PET series (Bq/mL or counts, GE/Siemens/Philips tags) "
                        "in OUT/dicom/<id>/ whose SUV is the image")

    p = add("train", "Train a VQ-VAE and the ILTM loop of masked Transformers into a run folder.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of scans (or images/ + labels/), CSV list, or one file")
    src.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run folder")
    p.add_argument("--out", type=Path, help="run folder to create (required with --data)")
    p.add_argument("--preset", default="tiny",
                   help="tiny (CPU: minutes in 2D, under an hour for 40 volumes of 48x56x48), small, paper "
                        "(default tiny)")
    p.add_argument("--config", type=Path, help="YAML config to start from instead of a preset")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-iterations", type=int,
                   help="ILTM iterations after the unmasked iteration 0 (default: the preset's; tiny: 3 in 2D, "
                        "1 in 3D)")
    p.add_argument("--constant-threshold", action="store_true", help="keep the resampling threshold constant")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    p.add_argument("--skip-unreadable", action="store_true", help="skip unreadable scans with a warning")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set transformer.epochs=10 (repeatable)")
    p.add_argument("--full-fit", type=int, action="append", metavar="K",
                   help="also fit iteration K's full-cohort Transformer, so that 'iltm detect --iteration K' can use "
                        "it (tiny and small fit only the one detection uses); with --resume on a finished run, only "
                        "that (repeatable)")

    p = add("detect", "Score scans with a trained run: <id>_score.nii.gz and <id>_mask.nii.gz per input.")
    p.add_argument("--run", required=True, type=Path, help="trained run folder, or a model bundle (.zip, iltm export)")
    p.add_argument("--input", required=True, type=Path, help="an image file, a folder of images or a CSV list")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--iteration", type=int, help="ILTM iteration whose Transformer to use (default: the one "
                                                 "training chose: with iltm.select_iteration=best, as in tiny, "
                                                 "the last unless it did worse than iteration 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--resampling-threshold", type=float, help="t: resample tokens with p < t (default from run)")
    p.add_argument("--samples", type=int, help="S: healed samples (default from run)")
    p.add_argument("--dropout-passes", type=int, help="D: dropout decodes per sample (default from run)")
    p.add_argument("--eps", type=float, help="KDE bandwidth regulariser (default 5 %% of intensity range)")
    p.add_argument("--density-threshold", type=float, help="tau: voxels with density < tau are anomalous")
    p.add_argument("--seed", type=int, default=0, help="seed of the token resampling")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run the resampling's model calls eagerly instead of replaying them from CUDA graphs")
    p.add_argument("--no-png", action="store_true", help="no PNG overlay for 2D inputs")
    p.add_argument("--lesions", action="store_true",
                   help="also write <id>_lesions.csv (per-region PET statistics) per scan and scans.csv (totals)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write <id>_seg.dcm, a DICOM SEG of the mask (inputs must be DICOM series)")
    p.add_argument("--split-lesions", action="store_true", help="with --dicom-seg: one segment per region")
    p.add_argument("--resume", action="store_true",
                   help="skip scans whose outputs (as asked by these flags) are all in OUT already; redo the others. "
                        "Refused when OUT/detect.json records another model, iteration or setting")
    p.add_argument("--units", help="unit of the PET values in the lesion tables' headers (default: SUV when the run "
                                   "reads data.units=suv or the inputs are not DICOM, else the series' Units tag)")

    p = add("lesions", "Per-lesion PET statistics of a binary map: volume, SUVmax/mean/peak, TLG, centroid.")
    p.add_argument("--pet", required=True, type=Path, help="PET image (SUV for SUV statistics) or DICOM series folder")
    p.add_argument("--mask", required=True, type=Path, help="binary map on the PET's grid (e.g. <id>_mask.nii.gz)")
    p.add_argument("--out", required=True, type=Path, help="CSV file to write (one row per connected region)")
    p.add_argument("--score", type=Path, help="anomaly score map on the same grid, for score_max and the scan score")
    p.add_argument("--units", default="SUV", help="unit of the PET values (default SUV; e.g. BQML for raw DICOM)")

    p = add("export", "Write a shareable model bundle (.zip): config, VQ-VAE, one iteration's Transformer, "
                      "metadata.json; nothing that names or holds a training scan.")
    p.add_argument("run", type=Path, help="trained run folder")
    p.add_argument("--out", required=True, type=Path, help="bundle to write (MODEL.zip)")
    p.add_argument("--iteration", type=int, help="ILTM iteration whose Transformer to export (default: the last)")
    p.add_argument("--units", default="as the training scans",
                   help="intensity units the model expects, recorded in metadata.json (e.g. SUV)")

    p = add("evaluate", "Voxel AUROC, AUPRO and best Dice of score maps against lesion labels.")
    p.add_argument("--scores", required=True, type=Path, help="folder of <id>_score.nii.gz")
    p.add_argument("--labels", required=True, type=Path, help="folder of <id>.nii.gz label maps (0/1)")
    p.add_argument("--out", type=Path, help="JSON file to write (default SCORES/metrics.json)")

    p = add("report", "Draw a run's per-iteration history and a montage of its masks.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--out", type=Path, help="folder for the figures (default RUN/report)")
    p.add_argument("--scans", type=int, default=6, help="training scans shown in the montage")

    p = add("demo", "Synthesise a cohort, train (tiny), detect on held-out scans, evaluate against a baseline.")
    p.add_argument("--out", type=Path, default=Path("iltm_demo"), help="demo folder (default ./iltm_demo)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--n-train", type=int, default=64, help="training scans, all with lesions (default 64)")
    p.add_argument("--n-test", type=int, default=16, help="held-out scans, 3/4 with lesions (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-iterations", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")

    p = add("suv", "Convert one DICOM PET series to body-weight SUV (QIBA rules) and print every value used.")
    p.add_argument("series", type=Path, metavar="SERIES_FOLDER", help="folder holding one DICOM PET series")
    p.add_argument("--out", required=True, type=Path, help="SUV image to write (float32, e.g. pet_suv.nii.gz)")
    p.add_argument("--weight", type=float, metavar="KG", help="patient weight in kg (replaces PatientWeight)")
    p.add_argument("--dose", type=float, metavar="MBQ",
                   help="injected dose in MBq at the injection time (replaces RadionuclideTotalDose)")
    p.add_argument("--injection-time", metavar="HH:MM:SS",
                   help="injection time of day on the scan's date (replaces RadiopharmaceuticalStartDateTime/Time)")
    p.add_argument("--half-life", type=float, metavar="S",
                   help="radionuclide half-life in seconds (replaces RadionuclideHalfLife; F-18: 6586.2)")

    for plugin in _plugins():  # e.g. the research bench's "benchmark"
        try:
            register = plugin.load()
        except ImportError:  # a plugin whose own dependencies are missing offers no command
            continue
        register(sub, common)
    return parser


def _plugins():
    """Entry points of the ``iltm.commands`` group: packages that add a subcommand (``register(sub, common)``).

    Every distribution on the path is asked, not only the first of each name: a stale ``iltm.egg-info`` earlier on
    ``sys.path`` (a source folder on the path, an old build) must not hide the installed package's plugins.
    """
    found = {}
    for dist in distributions():
        for plugin in dist.entry_points:
            if plugin.group == "iltm.commands":
                found.setdefault(plugin.name, plugin)
    return list(found.values())


def _tolerate_ascii_terminals() -> None:
    """Under an ASCII locale (LC_ALL=C), print "?" for the tables' "±" rather than fail after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slicer's Cancel and most job managers send), raised like Ctrl-C so the same clean-up runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # torchrun -m iltm -- detect --run RUN: torchrun would take --run for its --run-path
        argv = argv[1:]
    args = _parser().parse_args(argv)
    _tolerate_ascii_terminals()
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    else:
        previous_sigterm = None
    from .progress import Reporter
    from . import distributed

    reporter = Reporter(args.progress, enabled=int(os.environ.get("RANK", "0")) == 0)
    try:
        from . import commands

        handler = getattr(args, "handler", None) or getattr(commands, f"cmd_{args.command}")
        status = handler(args, reporter)
    except InputError as exc:
        message = printable(str(exc))
        print(f"iltm: error: {message}", file=sys.stderr)
        reporter.emit("error", message=message)
        return 2
    except BrokenPipeError:
        # The reader of stdout went away (``iltm evaluate ... | head``): not an error of ours, and no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"iltm: {'terminated' if terminated else 'interrupted'} (temporary files removed, finished steps "
              "kept; 'iltm train --resume RUN' continues a run)", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        distributed.cleanup()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
