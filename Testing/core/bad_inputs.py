"""A reusable corpus of bad inputs that every ``iltm`` command is run against (Testing/core/test_bad_input_corpus.py).

Each :class:`Probe` makes one bad thing of a *kind* (a bad image, run folder, checkpoint, output target, setting, CSV
list or file name); :data:`ADAPTERS` turn a bad thing of a kind into the arguments of one command, or None where the
command takes nothing of that kind. Every (command, probe) pair must end with exit code 2, exactly one
``iltm: error:`` line on stderr, no traceback, and no new file anywhere.

To cover a new command (``suv``, ``lesions``, ``export``), add it to :data:`COMMANDS` and give it an adapter; to add
a probe, append to :data:`PROBES`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch
import yaml

COMMANDS = ["train", "detect", "evaluate", "report", "lesions", "export", "suv"]
# The kinds of bad thing each command takes (its adapter turns each into arguments).
KINDS = {
    "train": {"image", "run", "checkpoint", "out", "setting", "csv", "name"},
    "detect": {"image", "run", "checkpoint", "out", "setting", "csv", "name"},
    "evaluate": {"image", "out", "name"},
    "report": {"image", "run", "out"},
    "lesions": {"image", "out", "name"},
    "export": {"run", "checkpoint", "out"},
    "suv": {"image", "out", "name"},
}


@dataclass
class Context:
    """What probes and adapters build on: the shared tiny cohort and run, and this test's own folder."""

    tmp: Path
    cohort: Path
    run: Path
    mounts: list = field(default_factory=list)
    expect: Optional[str] = None  # set by an adapter that renames the bad thing: what the error line must name

    @property
    def good_image(self) -> Path:
        return sorted((self.cohort / "images").glob("*.nii.gz"))[0]

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_copy(self, name: str = "run") -> Path:
        target = self.tmp / name
        shutil.copytree(self.run, target)
        return target


@dataclass
class Probe:
    """One bad thing: ``make(ctx)`` returns it (a path, or a list of arguments for kind "setting")."""

    name: str
    kind: str  # image, run, checkpoint, out, setting, csv, name
    make: Callable[[Context], object]
    expect: str = ""  # a substring the error line must hold
    subprocess: bool = False  # run the CLI in a child process (a defect here could abort the test process)


def _image(path: Path, array: np.ndarray, spacing=None) -> Path:
    img = sitk.GetImageFromArray(array.astype(np.float32))
    if spacing:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _bytes(ctx: Context, name: str, data: bytes) -> Path:
    path = ctx.folder("bad") / name
    path.write_bytes(data)
    return path


def _nan_image(ctx):
    a = np.ones((64, 64), np.float32)
    a[3, 4] = np.nan
    return _image(ctx.folder("bad") / "nan.nii.gz", a)


def _truncated(ctx):
    good = ctx.good_image.read_bytes()
    return _bytes(ctx, "cut.nii.gz", good[: len(good) // 2])


def _run_with(ctx, edit: Callable[[Path], None]) -> Path:
    run = ctx.run_copy()
    edit(run)
    return run


def _json_edit(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        value = json.loads((run / name).read_text(encoding="utf-8"))
        change(value)
        (run / name).write_text(json.dumps(value), encoding="utf-8")
    return edit


def _checkpoint_without(key: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        for path in [run / "vqvae.pt", *sorted(run.glob("iteration_*/transformer.pt"))]:
            payload = torch.load(path, weights_only=True)
            payload.pop(key, None)
            torch.save(payload, path)
    return edit


def _csv(ctx, scan_id: str) -> Path:
    path = ctx.folder("lists") / "scans.csv"
    path.write_text(f"image,id\n{ctx.good_image},{scan_id}\n", encoding="utf-8")
    return path


def _undecodable_file(ctx) -> Path:
    folder = ctx.folder("names")
    shutil.copy(ctx.good_image, os.fsdecode(bytes(folder) + b"/\xff.nii.gz"))
    return Path(os.fsdecode(bytes(folder) + b"/\xff.nii.gz"))


def _file_as_out(ctx) -> Path:
    path = ctx.folder("targets") / "taken"
    path.write_text("a file, not a folder")
    return path


def _under_a_file(ctx) -> Path:
    return _file_as_out(ctx) / "inside"


def _read_only(ctx) -> Optional[Path]:
    folder = ctx.folder("targets") / "readonly"
    folder.mkdir()
    if not mount(["--bind", str(folder), str(folder)], folder, ctx) or \
            not mount(["-o", "remount,bind,ro", str(folder), str(folder)], None, ctx):
        return None
    return folder / "out"


def _full_disk(ctx) -> Optional[Path]:
    folder = ctx.folder("targets") / "full"
    folder.mkdir()
    if not mount(["-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], folder, ctx):
        return None
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
    return folder / "out"


def mount(args: list, target: Optional[Path], ctx: Context) -> bool:
    """Run ``mount args`` (root only); remember ``target`` for :func:`unmount_all`. False when not permitted."""
    try:
        ok = subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    if ok and target is not None:
        ctx.mounts.append(target)
    return ok


def unmount_all(ctx: Context) -> None:
    for target in reversed(ctx.mounts):
        subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
    ctx.mounts.clear()


PROBES = [
    # bad images
    Probe("missing image", "image", lambda c: c.tmp / "bad" / "missing.nii.gz", "not found"),
    Probe("empty image", "image", lambda c: _bytes(c, "empty.nii.gz", b""), "empty"),
    Probe("not gzip", "image", lambda c: _bytes(c, "corrupt.nii.gz", b"\x1f\x8b not gzip at all"), "corrupt.nii.gz"),
    Probe("truncated NIfTI", "image", _truncated, "cut.nii.gz"),
    Probe("NaN voxels", "image", _nan_image, "NaN"),
    Probe("unknown format", "image", lambda c: _bytes(c, "notes.xyz", b"hello"), "notes.xyz"),
    # bad run folders
    Probe("no run folder", "run", lambda c: c.tmp / "nowhere", "nowhere"),
    Probe("history.json not JSON", "run", lambda c: _run_with(c, lambda r: (r / "history.json").write_text("{")),
          "history.json"),
    Probe("history iterations not a list", "run",
          lambda c: _run_with(c, _json_edit("history.json", lambda v: v.update(iterations={"0": 1}))), "history.json"),
    Probe("history iteration without number", "run",
          lambda c: _run_with(c, _json_edit("history.json", lambda v: v["iterations"][0].pop("iteration"))),
          "history.json"),
    Probe("history value not a number", "run",
          lambda c: _run_with(c, _json_edit("history.json",
                                            lambda v: v["iterations"][0].update(masked_fraction="many"))),
          "history.json"),
    Probe("manifest images not a list", "run",
          lambda c: _run_with(c, _json_edit("manifest.json", lambda v: v.update(images="all"))), "manifest.json"),
    Probe("manifest id escapes", "run",
          lambda c: _run_with(c, _json_edit("manifest.json", lambda v: v["images"][0].update(id="../../x"))),
          "manifest.json"),
    Probe("checkpoint without state_dict", "checkpoint", lambda c: _run_with(c, _checkpoint_without("state_dict")),
          "lacks state_dict"),
    Probe("checkpoint without config", "checkpoint", lambda c: _run_with(c, _checkpoint_without("config")), "lacks config"),
    Probe("checkpoint truncated", "checkpoint",
          lambda c: _run_with(c, lambda r: (r / "vqvae.pt").write_bytes((r / "vqvae.pt").read_bytes()[:2000])),
          "vqvae.pt"),
    # bad output targets
    Probe("--out is a file", "out", _file_as_out, "taken"),
    Probe("--out under a file", "out", _under_a_file, "inside"),
    Probe("--out read-only", "out", _read_only, "read-only"),
    Probe("--out on a full disk", "out", _full_disk, "no space left on device"),
    # bad settings (item 4 of issue 19: validated before any data is read)
    Probe("samples=0", "setting", lambda c: ["--set", "detection.samples=0"], "detection.samples"),
    Probe("learning_rate=fast", "setting", lambda c: ["--set", "transformer.learning_rate=fast"],
          "transformer.learning_rate"),
    Probe("spatial_size=[64", "setting", lambda c: ["--set", "data.spatial_size=[64"], "[64"),
    Probe("max-iterations -1", "setting", lambda c: ["--max-iterations", "-1"], "max_iterations"),
    Probe("config spatial_size: sixty-four", "setting",
          lambda c: ["--config", _write_yaml(c, {"data": {"spatial_size": "sixty-four"}})], "spatial_size"),
    # CSV ids that would name files outside the output folder
    Probe("id ../../escape", "csv", lambda c: _csv(c, "../../escape"), "line 2"),
    Probe("absolute id", "csv", lambda c: _csv(c, str(c.tmp / "elsewhere" / "x")), "line 2"),
    Probe("id with a separator", "csv", lambda c: _csv(c, "a/b"), "line 2"),
    Probe("id ..", "csv", lambda c: _csv(c, ".."), "line 2"),
    Probe("id with a control character", "csv", lambda c: _csv(c, "a\tb"), "line 2"),
    # names that are not UTF-8 (SimpleITK aborted the process on them)
    Probe("non-UTF-8 file name", "name", _undecodable_file, "\\xff", subprocess=True),
]


def _write_yaml(ctx, value: dict) -> str:
    path = ctx.folder("configs") / "bad.yaml"
    path.write_text(yaml.safe_dump(value), encoding="utf-8")
    return str(path)


def _scores_with(ctx: Context, score: Path) -> tuple[Path, Path]:
    """A scores folder whose only score map is ``score`` and a labels folder with a good label for it."""
    scores, labels = ctx.folder("scores"), ctx.folder("labels")
    if score.exists():
        shutil.copy(score, os.fsdecode(bytes(scores) + b"/case" + b"_score.nii.gz"))
    label = sorted((ctx.cohort / "labels").glob("*.nii.gz"))[0]
    shutil.copy(label, labels / "case.nii.gz")
    return scores, labels


def _train(ctx: Context, kind: str, bad) -> Optional[list]:
    out = ctx.tmp / "trained"
    if kind in ("image", "csv", "name"):
        return ["train", "--data", bad, "--out", out]
    if kind in ("run", "checkpoint"):
        return ["train", "--resume", bad]
    if kind == "out":
        return ["train", "--data", ctx.cohort, "--out", bad]
    if kind == "setting":
        return ["train", "--data", ctx.cohort, "--out", out, *bad]
    return None


def _detect(ctx: Context, kind: str, bad) -> Optional[list]:
    out = ctx.tmp / "detected"
    if kind in ("image", "csv", "name"):
        return ["detect", "--run", ctx.run, "--input", bad, "--out", out]
    if kind in ("run", "checkpoint"):
        return ["detect", "--run", bad, "--input", ctx.good_image, "--out", out]
    if kind == "out":
        return ["detect", "--run", ctx.run, "--input", ctx.good_image, "--out", bad]
    if kind == "setting":
        flags = {"detection.samples=0": ["--samples", "0"]}.get(bad[-1]) if bad[0] == "--set" else None
        return ["detect", "--run", ctx.run, "--input", ctx.good_image, "--out", out, *flags] if flags else None
    return None


def _evaluate(ctx: Context, kind: str, bad) -> Optional[list]:
    metrics = ctx.tmp / "metrics.json"
    if kind == "image":
        if not bad.exists():
            return None  # a score map that is not there is not listed; nothing to probe
        scores, labels = _scores_with(ctx, bad)
        ctx.expect = "case_score.nii.gz"
        return ["evaluate", "--scores", scores, "--labels", labels, "--out", metrics]
    if kind == "name":
        # a score map with the undecodable name, and an empty undecodable sub-folder among the labels
        scores, labels = _scores_with(ctx, ctx.good_image)
        (scores / "case_score.nii.gz").unlink()
        os.rename(bad, os.fsdecode(bytes(scores) + b"/\xff_score.nii.gz"))
        os.mkdir(os.fsdecode(bytes(labels) + b"/\xff"))
        return ["evaluate", "--scores", scores, "--labels", labels, "--out", metrics]
    if kind == "out":
        scores, labels = _scores_with(ctx, ctx.good_image)
        return ["evaluate", "--scores", scores, "--labels", labels, "--out", bad / "metrics.json"]
    return None


def _report(ctx: Context, kind: str, bad) -> Optional[list]:
    if kind == "run":
        return ["report", bad, "--out", ctx.tmp / "figures"]
    if kind == "out":
        return ["report", ctx.run, "--out", bad]
    if kind == "image":
        run = ctx.run_copy("run_bad_scan")
        manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
        manifest["images"][0]["image"] = str(bad)
        (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        return ["report", run, "--out", ctx.tmp / "figures"]
    return None


def _lesions(ctx: Context, kind: str, bad) -> Optional[list]:
    label = sorted((ctx.cohort / "labels").glob("*.nii.gz"))[0]
    if kind in ("image", "name"):
        return ["lesions", "--pet", bad, "--mask", label, "--out", ctx.tmp / "lesions.csv"]
    if kind == "out":
        return ["lesions", "--pet", ctx.good_image, "--mask", label, "--out", bad / "lesions.csv"]
    return None


def _export(ctx: Context, kind: str, bad) -> Optional[list]:
    if kind in ("run", "checkpoint"):
        return ["export", bad, "--out", ctx.tmp / "model.zip"]
    if kind == "out":
        return ["export", ctx.run, "--out", bad / "model.zip"]
    return None


def _suv(ctx: Context, kind: str, bad) -> Optional[list]:
    if kind in ("image", "name"):  # a file, not a series folder, or an unreadable one
        return ["suv", bad, "--out", ctx.tmp / "suv.nii.gz"]
    if kind == "out":
        from iltm.dicom_pet import synthetic_tags, write_pet_series

        series = ctx.tmp / "series"
        if not series.exists():
            volume = sitk.JoinSeries(sitk.ReadImage(str(ctx.good_image)))  # the 2D scan as a one-slice volume
            stored, tags = synthetic_tags(volume, "GE", np.random.default_rng(0), "probe")
            write_pet_series(series, stored, tags)
        return ["suv", series, "--out", bad / "suv.nii.gz"]
    return None


ADAPTERS = {"train": _train, "detect": _detect, "evaluate": _evaluate, "report": _report, "lesions": _lesions,
            "export": _export, "suv": _suv}
