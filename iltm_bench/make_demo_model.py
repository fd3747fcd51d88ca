"""Make the Slicer extension's try-out files: a demo model bundle of synthetic phantoms and a synthetic PET to try it on.

    python -m iltm_bench.make_demo_model            # about 10 minutes on 2 CPU cores

It runs the same steps as the CLI sequence

    iltm synth --out WORK/data --dims 3 --n 12 --size 24 24 32 --anomalous-fraction 1 --seed 0
    iltm train --data WORK/data --out WORK/run --preset tiny --max-iterations 1 --seed 0 --device cpu \\
        --set vqvae.epochs=50 --set vqvae.min_steps=600 --set vqvae.collapse_retries=0 --set data.elastic_3d=false
    iltm export WORK/run --out ILTMAnomaly/Resources/Models/iltm-demo-synthetic-pet-tiny.zip --units SUV
    iltm synth --out WORK/sample --dims 3 --n 1 --size 24 24 32 --anomalous-fraction 1 --seed 1000
      (its one image -> ILTMAnomaly/Resources/SampleData/iltm-synthetic-pet.nii.gz)

The model is the ``tiny`` preset cut down so that it trains in minutes on a CPU (fewer VQ-VAE epochs and steps, no 3D
elastic augmentation): it shows the workflow, it is no model of real patients. The sample PET is a held-out phantom
(another seed) with lesions, on the grid the model was trained on.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from iltm.cli import main as iltm

RESOURCES = Path(__file__).resolve().parents[1] / "ILTMAnomaly" / "Resources"
MODEL = RESOURCES / "Models" / "iltm-demo-synthetic-pet-tiny.zip"
SAMPLE = RESOURCES / "SampleData" / "iltm-synthetic-pet.nii.gz"
SIZE = ["24", "24", "32"]
TRAIN = ["--preset", "tiny", "--max-iterations", "1", "--seed", "0", "--device", "cpu",
         "--set", "vqvae.epochs=50", "--set", "vqvae.min_steps=600", "--set", "vqvae.collapse_retries=0",
         "--set", "data.elastic_3d=false"]


def make(work: Path, model: Path = MODEL, sample: Path = SAMPLE, progress: str = "bar") -> None:
    def run(*args) -> None:
        status = iltm([str(a) for a in args] + ["--progress", progress])
        if status:
            raise SystemExit(status)

    run("synth", "--out", work / "data", "--dims", "3", "--n", "12", "--size", *SIZE, "--anomalous-fraction", "1",
        "--seed", "0")
    run("train", "--data", work / "data", "--out", work / "run", *TRAIN)
    run("export", work / "run", "--out", model, "--units", "SUV")
    run("synth", "--out", work / "sample", "--dims", "3", "--n", "1", "--size", *SIZE, "--anomalous-fraction", "1",
        "--seed", "1000")
    image, = sorted((work / "sample" / "images").glob("*.nii.gz"))
    sample.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, sample)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the cohort and the run (default: a temporary one)")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    if args.work is not None:
        make(args.work, args.model, args.sample)
        return
    with tempfile.TemporaryDirectory(prefix="iltm-demo-model-") as work:
        make(Path(work), args.model, args.sample)


if __name__ == "__main__":
    main()
