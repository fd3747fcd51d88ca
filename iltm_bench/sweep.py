"""``iltm benchmark``: the contamination sweep of the paper (Figures 3-5, Table 1) on synthetic PET-like data.

For each anomalous fraction of the training cohort, every method is trained on a synthetic cohort with that
fraction of lesion-bearing scans and evaluated on one fixed held-out test set (its own seed, half of it
anomalous) with the paper's voxel metrics. Results go into CSV files row by row, so an interrupted sweep
continues where it stopped: a (method, fraction) pair already in the CSV is not redone, and run folders, models
and score maps already on disk are reused.

::

    DIR/benchmark.json                       the sweep's settings and the invocations that built it (command, time)
    DIR/contamination_sweep.csv              one row per (method, fraction)
    DIR/iltm_iterations.csv                  one row per (threshold schedule, fraction, ILTM iteration)
    DIR/test/                                held-out cohort (images/, labels/, manifest.json; with
                                             --eval-split val the families' validation split)
    DIR/fraction_0.4/train/                  the training cohort with 40 % anomalous scans
    DIR/fraction_0.4/runs/iltm/              ILTM run folder (decreasing threshold; iteration 0 = no ILTM)
    DIR/fraction_0.4/runs/iltm_constant/     the same with a constant threshold (--constant-threshold-too)
    DIR/fraction_0.4/runs/ae.pt, vae.pt      Dense AE / VAE (nsa.pt: NSA, cutpaste.pt: CutPaste)
    DIR/fraction_0.4/scores/<method>/...     test-set score maps (<id>_score.nii.gz)
    DIR/test/scores_intensity/               the test scans' own intensities as score maps (method ``intensity``)
    DIR/figure3_iterations.png, figure4_metrics_vs_fraction.png, figure5_qualitative.png, table1.md

Methods: ``intensity`` (no model: the scan's own intensity is the score, the same at every fraction; what a
method must beat on hot lesions), ``ae`` and ``vae`` (Dense AE / VAE, :mod:`iltm_bench.baselines`), ``nsa`` and
``cutpaste`` (self-supervised, :mod:`iltm_bench.nsa`, :mod:`iltm_bench.cutpaste`), ``vqvae_transformer`` (iteration 0 of the
ILTM run: the same VQ-VAE + Transformer pipeline without token masking) and ``iltm`` (the run's last iteration).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from iltm.errors import InputError
from iltm.progress import Reporter

SWEEP_CSV = "contamination_sweep.csv"
ITERATIONS_CSV = "iltm_iterations.csv"
SETTINGS_JSON = "benchmark.json"
FIGURE3, FIGURE4, FIGURE5, TABLE1 = ("figure3_iterations.png", "figure4_metrics_vs_fraction.png",
                                     "figure5_qualitative.png", "table1.md")
SWEEP_COLUMNS = ["method", "anomalous_fraction", "auroc", "aupro", "best_dice", "auroc_std", "aupro_std",
                 "best_dice_std", "iteration", "seconds"]
ITERATION_COLUMNS = ["threshold_schedule", "anomalous_fraction", "iteration", "auroc", "aupro", "best_dice",
                     "auroc_std", "aupro_std", "best_dice_std", "resampling_threshold", "masked_fraction"]
DATA_FAMILIES = ("phantom", "texture", "anatomy")  # iltm synth's phantom, or iltm_bench.families
EVAL_SPLITS = ("test", "val")  # the families' split that the held-out cohort comes from; defaults are chosen on val
METHODS = ("intensity", "ae", "vae", "nsa", "cutpaste", "vqvae_transformer", "iltm")
OWN_SETTINGS_KEYS = ("settings", "invocations", "preset", "dims")  # what a sweep process writes to benchmark.json
BASELINES = ("intensity", "ae", "vae", "nsa", "cutpaste", "vqvae_transformer")  # what ILTM is compared with
METHOD_NAMES = {"intensity": "Intensity (no model)", "ae": "Dense AE", "vae": "Dense VAE",
                "nsa": "NSA (self-supervised)", "cutpaste": "CutPaste (self-supervised)",
                "vqvae_transformer": "VQ-VAE + Transformer (no ILTM)",
                "iltm": "ILTM", "iltm_constant": "ILTM, constant threshold",
                "iltm_best": "ILTM, best iteration (label-free choice)"}
METRICS = (("auroc", "AUROC"), ("aupro", "AUPRO"), ("best_dice", "best Dice"))
TEST_FRACTION = 0.5
# Table 1 of the paper (PET, all training scans anomalous), for orientation only: other data, other scale.
PAPER_TABLE1 = {"ae": (66.5, 63.7, 41.1), "vae": (76.1, 70.5, 43.5), "vqvae_transformer": (85.7, 82.1, 59.6),
                "iltm": (92.6, 89.0, 68.3)}
EXAMPLE = """examples:
  iltm benchmark --out sweep2d --dims 2 --preset tiny --n-train 40 --n-test 20
  iltm benchmark --out docs/results/sweep --dims 3 --preset small --fractions 0 0.2 0.4 0.6 0.8 1.0 \\
      --n-train 40 --n-test 20 --seed 0 --constant-threshold-too
  iltm benchmark --out sweep2d --dims 2 --preset tiny --set vqvae.epochs=10 --set baselines.epochs=10
  iltm benchmark --out sweep2d --figures-only
  iltm benchmark --out sweep2d_seeds --combine sweep2d sweep2d_seed1 sweep2d_seed2

Run the same command again to continue an interrupted sweep; rows already in the CSV are kept.
Several processes (one per GPU or node) may share --out if each takes other --fractions (same other settings);
rows are appended as each finishes; run the full command once more at the end to draw the figures from them all.
(This needs POSIX file locks, as on Linux and macOS; on Windows give each process its own --out.)"""


@dataclass
class SweepSettings:
    """What one sweep is. The fields in ``IDENTITY`` must not change between invocations on the same folder.

    Args:
        overrides: ``SECTION.KEY=VALUE`` for the ILTM config (``vqvae.epochs=10``) or, with the ``baselines.``
            prefix, for :class:`iltm_bench.baselines.BaselineConfig` (``baselines.epochs=10``).
        test_threshold: ``"fixed"`` scores the test set with the config's resampling threshold t at every
            iteration (what ``iltm detect`` does); ``"iteration"`` with that iteration's own (decayed) threshold.
        constant_fractions: the fractions that also get the constant-threshold run; ``None`` = all of them.
        cases: test scans shown in Figure 5.
    """

    out: Path
    dims: int = 2
    preset: str = "tiny"
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    n_train: int = 40
    n_test: int = 20
    seed: int = 0
    test_seed: int | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    constant_threshold_too: bool = False
    constant_fractions: list[float] | None = None
    size: list[int] | None = None
    overrides: list[str] = field(default_factory=list)
    max_iterations: int | None = None
    device: str = "auto"
    test_threshold: str = "fixed"
    cases: int = 3
    data_family: str = "phantom"
    eval_split: str = "test"

    IDENTITY = ("dims", "preset", "n_train", "n_test", "seed", "test_seed", "size", "overrides", "max_iterations",
                "test_threshold", "data_family", "eval_split")

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.test_seed is None:
            self.test_seed = self.seed + 1000
        if self.dims not in (2, 3):
            raise InputError("--dims", f"must be 2 or 3, not {self.dims}")
        if not self.fractions:
            raise InputError("--fractions", "give at least one anomalous fraction")
        bad = [f for f in self.fractions if not 0.0 <= f <= 1.0]
        if bad:
            raise InputError("--fractions", f"{bad} outside [0, 1]")
        self.fractions = sorted({round(float(f), 6) for f in self.fractions})
        if self.constant_fractions is not None:
            self.constant_threshold_too = True
            extra = [f for f in self.constant_fractions if round(float(f), 6) not in self.fractions]
            if extra:
                raise InputError("--constant-threshold-too", f"{extra} are not among --fractions {self.fractions}")
            self.constant_fractions = sorted({round(float(f), 6) for f in self.constant_fractions})
        if self.n_train < 2:
            raise InputError("--n-train", f"needs at least 2 training scans, not {self.n_train}")
        if round(TEST_FRACTION * self.n_test) < 1 or self.n_test < 2:
            raise InputError("--n-test", f"needs at least 2 test scans (one with lesions), not {self.n_test}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InputError("--methods", f"unknown {unknown} (choose from {', '.join(METHODS)})")
        self.methods = [m for m in METHODS if m in self.methods]
        if self.test_threshold not in ("fixed", "iteration"):
            raise InputError("--test-threshold", "must be 'fixed' or 'iteration'")
        for item in self.overrides:
            if "=" not in item:
                raise InputError("--set", f"'{item}' is not SECTION.KEY=VALUE")
        if self.data_family not in DATA_FAMILIES:
            raise InputError("--data-family", f"unknown '{self.data_family}' (choose from {', '.join(DATA_FAMILIES)})")
        if self.data_family != "phantom" and (self.dims != 2 or (self.size and len(set(self.size)) != 1)):
            raise InputError("--data-family", f"{self.data_family} cohorts are 2D and square (--dims 2, one --size)")
        if self.eval_split not in EVAL_SPLITS:
            raise InputError("--eval-split", f"unknown '{self.eval_split}' (choose from {', '.join(EVAL_SPLITS)})")
        if self.eval_split != "test" and self.data_family == "phantom":
            raise InputError("--eval-split", "the phantom has no splits: its validation cohorts are other --test-seed "
                                             "values; --eval-split val needs --data-family texture or anatomy")

    # Settings that came later: a benchmark.json without them was made with these values, and they are written
    # only when they differ, so older sweep folders stay as they were.
    LATER = {"data_family": "phantom", "eval_split": "test"}

    def identity(self, complete: bool = False) -> dict[str, Any]:
        """The settings that make the sweep (``complete``: also the later ones at their old values)."""
        ident = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(self).items()
                 if k in self.IDENTITY}
        return ident if complete else {k: v for k, v in ident.items() if self.LATER.get(k, object()) != v}


    @property
    def runs_iltm(self) -> bool:
        return "iltm" in self.methods or "vqvae_transformer" in self.methods


def configs(settings: SweepSettings):
    """(ILTM Config, BaselineConfig) of the preset with the sweep's overrides, built and validated as one tree."""
    from iltm.synth import SUV_CLIP

    from .baselines import build_config

    # The cohorts are synthetic SUV: clip at a fixed SUV (a --set data.clip_value=... still wins). The sweep scores
    # every iteration on the test set, so every iteration's full-cohort Transformer is fitted (the same models).
    from .families import FAMILY_SETTINGS

    family = FAMILY_SETTINGS.get(settings.data_family, [])
    tree = build_config(settings.preset, [f"data.clip_value={SUV_CLIP}", "iltm.full_transformers=every", *family,
                                          *settings.overrides],
                        seed=settings.seed,
                        device=settings.device, iltm__max_iterations=settings.max_iterations)
    return tree.core(), tree.baselines


# What each family's cohorts are, in a table's words (iltm_bench.families for the real-image ones).
DATA_TEXT = {"phantom": "Synthetic PET-like", "texture": "Texture photographs (scikit-image) with drawn defects,",
             "anatomy": "MNI152 template slices made FDG-PET-like,"}


def data_text(settings: dict[str, Any]) -> str:
    """The sweep's data in words, e.g. "Synthetic PET-like 2D data": a sweep folder's settings (``benchmark.json``'s
    ``settings``; one made before the families names none, and is the phantom)."""
    family = settings.get("data_family", "phantom")
    split = " (validation split)" if settings.get("eval_split", "test") == "val" else ""
    return f"{DATA_TEXT.get(family, family)} {settings.get('dims', '?')}D data{split}"


def figure_title(settings: dict[str, Any]) -> str:
    """A figure's title from a sweep folder's settings: family, dimensions and preset."""
    family = settings.get("data_family", "synthetic")
    return f"{family} {settings.get('dims', '?')}D, preset {settings.get('preset', '?')}"


def fraction_text(fraction: float) -> str:
    return f"{float(fraction):g}"


# -- CSV tables that grow row by row ---------------------------------------------------------------------------

class ResultTable:
    """A CSV file of result rows, appended (and flushed) one row at a time, looked up by its key columns."""

    def __init__(self, path: Path, columns: list[str], key: tuple[str, ...]):
        self.path, self.columns, self.key = Path(path), columns, key
        self.rows: list[dict[str, str]] = []
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = [c for c in columns if c not in (reader.fieldnames or [])]
                if missing:
                    raise InputError(self.path, f"is not a benchmark table (columns {', '.join(missing)} missing)")
                self.rows = [row for row in reader if row.get(columns[0])]

    @staticmethod
    def _norm(column: str, value: Any) -> str:
        if column == "anomalous_fraction":
            return fraction_text(float(value))
        if column == "iteration" and value not in ("", None):
            return str(int(value))
        return str(value)

    def _key_of(self, row: dict[str, Any]) -> tuple[str, ...]:
        return tuple(self._norm(c, row[c]) for c in self.key)

    def get(self, **key: Any) -> dict[str, str] | None:
        wanted = self._key_of(key)
        for row in self.rows:
            if self._key_of(row) == wanted:
                return row
        return None

    def append(self, row: dict[str, Any]) -> dict[str, str]:
        text = {c: _cell(row.get(c)) for c in self.columns}
        text.update({c: self._norm(c, row[c]) for c in self.key})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file() or not self.path.stat().st_size:
            try:  # exclusive create: of two processes sharing the folder, only one writes the header
                with self.path.open("x", newline="", encoding="utf-8") as f:
                    csv.DictWriter(f, fieldnames=self.columns).writeheader()
            except FileExistsError:
                pass
        with self.path.open("a", newline="", encoding="utf-8") as f:  # one appended line per row: processes may share the file
            csv.DictWriter(f, fieldnames=self.columns).writerow(text)
            f.flush()
        self.rows.append(text)
        return text


def _invocation_key(invocation: dict[str, Any]) -> tuple:
    return tuple(str(invocation.get(k)) for k in ("started", "command", "host", "pid"))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of a benchmark CSV with numbers as floats (empty cells as ``None``)."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for k, v in row.items():
            if k in ("method", "threshold_schedule"):
                parsed[k] = v
            elif v in ("", None):
                parsed[k] = None
            else:
                try:
                    parsed[k] = float(v)
                except ValueError:
                    parsed[k] = v
        out.append(parsed)
    return out


# -- the pieces of one sweep ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked_file(path: Path, blocking: bool = True):
    """Open ``path`` ("a+") and hold an exclusive POSIX lock on it; yields the file, or None where there are no
    POSIX locks (Windows: processes must not share a sweep folder there). Not blocking: BlockingIOError if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as f:
        try:
            import fcntl
        except ImportError:
            yield None
            return
        fcntl.flock(f, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock on ``folder`` (a hidden file beside it) against other processes sharing the sweep."""
    with _locked_file(folder.parent / f".{folder.name}.lock"):
        yield


@contextlib.contextmanager
def fraction_claim(out: Path, fraction: float):
    """Claim one fraction of the sweep in ``out`` for this process while it runs; another process sharing the folder
    and given the same fraction gets a clear error at once instead of training the same models beside it."""
    path = out / f".fraction_{fraction_text(fraction)}.lock"
    with contextlib.ExitStack() as stack:
        try:
            f = stack.enter_context(_locked_file(path, blocking=False))
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8").strip() or "another process"
            raise InputError(out, f"fraction {fraction:g} is being run by {holder}; processes sharing a sweep "
                                  "folder need different --fractions") from None
        if f is not None:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()} on {socket.gethostname()}")
            f.flush()
        yield


def ensure_cohort(folder: Path, dims: int, n: int, fraction: float, seed: int, size, reporter: Reporter,
                  family: str = "phantom", split: str = "train") -> Path:
    """The cohort in ``folder`` (``iltm synth``'s phantom, or a :mod:`iltm_bench.families` family's ``split``),
    generated unless an identical one is already there.

    Processes sharing a sweep folder start together: the first one generates the (shared) test cohort while the
    others wait for it.
    """
    with folder_lock(folder):
        if family == "phantom":
            return _ensure_cohort(folder, dims, n, fraction, seed, size, reporter)
        from .families import DEFAULT_SIZE, make_family_cohort, same_cohort

        side = int(size[0]) if size else DEFAULT_SIZE
        if not same_cohort(folder, family, n, fraction, seed, split, side):
            make_family_cohort(folder, family, n, fraction, seed, split, side, progress=reporter)
        return folder


def _ensure_cohort(folder: Path, dims: int, n: int, fraction: float, seed: int, size, reporter: Reporter) -> Path:
    from iltm.synth import DEFAULT_SIZE, make_cohort

    manifest_path = folder / "manifest.json"
    want_size = [int(s) for s in (size or DEFAULT_SIZE[dims])]
    if len(want_size) == 1:
        want_size = want_size * dims
    if manifest_path.is_file():
        try:
            m = json.loads(manifest_path.read_text(encoding="utf-8"))
            same = (m.get("n") == n and m.get("dims") == dims and m.get("seed") == seed
                    and abs(float(m.get("anomalous_fraction", -1)) - fraction) < 1e-9
                    and list(m.get("size", [])) == want_size
                    and all((folder / s["image"]).is_file() and (folder / s["label"]).is_file()
                            for s in m.get("subjects", [])))
        except (ValueError, KeyError, TypeError):
            same = False
        if same:
            return folder
    make_cohort(folder, dims=dims, n=n, anomalous_fraction=fraction, seed=seed, size=want_size, progress=reporter)
    return folder


def ensure_run(root: Path, cfg, data: Path, reporter: Reporter):
    """A finished ILTM run folder at ``root``: reused when finished, resumed when interrupted, else trained."""
    from iltm.run import RunFolder
    from iltm.train import train

    run = RunFolder(root)
    if run.manifest_path.is_file() and run.config_path.is_file():
        if run.history().get("finished"):
            return run
        return train(root, resume=True, reporter=reporter)
    if root.exists():
        shutil.rmtree(root)  # a start that died before writing its config left nothing worth keeping
    return train(root, cfg=copy.deepcopy(cfg), data=data, reporter=reporter)


def seed_constant_run(source, root: Path) -> bool:
    """Start the constant-threshold run from the decreasing run's VQ-VAE and iteration 0.

    Iteration 0 uses t0 under both schedules, so its Transformer and masks are the same; copying them saves the
    VQ-VAE, one Transformer fit and one detection pass over the training set. Returns False (nothing copied)
    when the source has no finished iteration 0.
    """
    from iltm.layout import FORMAT_VERSION
    from iltm.run import RunFolder

    history = source.history()
    first = [r for r in history["iterations"] if r["iteration"] == 0]
    if not first or not source.transformer_path(0).is_file():
        return False
    partial = RunFolder(root.with_name(root.name + ".partial"))
    if partial.root.exists():
        shutil.rmtree(partial.root)
    partial.root.mkdir(parents=True)
    cfg = source.config()
    cfg.iltm.constant_threshold = True
    cfg.save(partial.config_path)
    for path in ("manifest_path", "vqvae_path", "tokens_path"):
        shutil.copy2(getattr(source, path), getattr(partial, path))
    shutil.copytree(source.iteration_dir(0), partial.iteration_dir(0))
    seeded = {"version": FORMAT_VERSION, "vqvae": history.get("vqvae"), "iterations": first, "finished": False,
              "stop_reason": None, "seeded_from": str(source.root)}
    if "transformer_epochs" in history:  # the epochs iteration 0 chose, which config.yaml carries over
        seeded["transformer_epochs"] = history["transformer_epochs"]
    partial.history_path.write_text(json.dumps(seeded, indent=2, default=str) + "\n", encoding="utf-8")
    partial.root.rename(root)
    return True


def _timed_scores(folder: Path, records, write) -> float:
    """Call ``write(missing_records)`` for the records without a score map; returns all scoring seconds so far
    (kept in ``folder/seconds.json`` so that a resumed sweep still reports the full time)."""
    from iltm.layout import SCORE_SUFFIX

    folder.mkdir(parents=True, exist_ok=True)
    timing = folder / "seconds.json"
    before = json.loads(timing.read_text(encoding="utf-8"))["seconds"] if timing.is_file() else 0.0
    missing = [r for r in records if not (folder / f"{r.id}{SCORE_SUFFIX}").is_file()]
    if not missing:
        return before
    start = time.perf_counter()
    write(missing)
    total = before + time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": total}) + "\n", encoding="utf-8")
    return total


def metrics_of(scores_dir: Path, labels_dir: Path) -> dict[str, Any]:
    from iltm.evaluate import load_pairs, summarise

    _, scores, labels = load_pairs(scores_dir, labels_dir)
    return summarise(scores, labels)


def evaluate_iteration(run, k: int, settings: SweepSettings, records, labels_dir: Path, scores_dir: Path,
                       reporter: Reporter) -> tuple[dict[str, Any], float]:
    """Score the test set with iteration k's Transformer; returns (metrics, test scoring seconds)."""
    from iltm.detect import Detector, detect_files
    from iltm.train import iteration_threshold

    def write(missing):
        cfg = run.config()
        detection = None
        if settings.test_threshold == "iteration":
            detection = replace(cfg.detection, resampling_threshold=iteration_threshold(cfg, k))
        detector = Detector.from_run(run, k, settings.device, detection=detection)
        problems = detect_files(detector, missing, scores_dir, reporter, seed=settings.seed, png=False)
        if problems:
            raise InputError(scores_dir, "; ".join(problems))

    seconds = _timed_scores(scores_dir, records, write)
    return metrics_of(scores_dir, labels_dir), seconds


def _metric_row(summary: dict[str, Any]) -> dict[str, Any]:
    # summarise() gives None where a metric is undefined; the sweep's CSV keeps nan there.
    return {k: float("nan") if summary[k] is None else float(summary[k]) for k in ("auroc", "aupro", "best_dice", "auroc_std", "aupro_std", "best_dice_std")}


def _metrics_from_row(row: dict[str, str]) -> dict[str, Any]:
    return {k: float(row[k]) for k in ("auroc", "aupro", "best_dice", "auroc_std", "aupro_std", "best_dice_std")}


class Sweep:
    """One contamination sweep in ``settings.out``; :meth:`run` does (or finishes) it."""

    def __init__(self, settings: SweepSettings, reporter: Reporter):
        self.s = settings
        self.reporter = reporter
        # Inner stages get their own reporter: train() resets the overall-progress bookkeeping of the one it gets.
        self.inner = Reporter("bar" if reporter.mode == "bar" else "none")
        self.out = settings.out
        self.sweep = ResultTable(self.out / SWEEP_CSV, SWEEP_COLUMNS, ("method", "anomalous_fraction"))
        self.iterations = ResultTable(self.out / ITERATIONS_CSV, ITERATION_COLUMNS,
                                      ("threshold_schedule", "anomalous_fraction", "iteration"))
        self.cfg, self.baseline_cfg = configs(settings)
        self.own_invocations: list[dict[str, Any]] = []

    def fraction_dir(self, fraction: float) -> Path:
        return self.out / f"fraction_{fraction_text(fraction)}"

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def check_settings(self) -> dict[str, Any]:
        path = self.out / SETTINGS_JSON
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            there = {**self.s.LATER, **stored.get("settings", {})}
            differ = {k: (there.get(k), v) for k, v in self.s.identity(complete=True).items() if there.get(k) != v}
            if differ:
                listing = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
                raise InputError(self.out, f"holds a sweep with other settings ({listing}); "
                                           "use a new --out or the same settings")
            return stored
        return {"settings": self.s.identity(), "invocations": []}

    def save_settings(self, state: dict[str, Any]) -> None:
        """Write this process's part of ``benchmark.json``: the settings, preset, dims and its own invocations.

        Everything else in the file as it is now on disk is kept: the invocations of other processes sharing the
        folder and keys written since this process read it (a ``note``). The read and the write are one step
        under the folder's lock, so two processes saving at once do not drop each other's records.
        """
        from iltm.io import atomic_write_text

        path = self.out / SETTINGS_JSON
        mine = {_invocation_key(i) for i in self.own_invocations}
        with folder_lock(path):
            try:
                on_disk = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, ValueError):
                on_disk = {}
            on_disk = on_disk if isinstance(on_disk, dict) else {}
            others = [i for i in on_disk.get("invocations", []) if _invocation_key(i) not in mine]
            state["invocations"] = sorted(others + self.own_invocations, key=lambda i: str(i.get("started", "")))
            merged = {**on_disk, **{k: state[k] for k in OWN_SETTINGS_KEYS if k in state}}
            atomic_write_text(path, json.dumps(merged, indent=2, default=str) + "\n")

    def start_invocation(self, command: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check the folder's settings and record this invocation in ``benchmark.json``: (state, invocation)."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.check_settings()
        invocation = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0,
                      "fractions": self.s.fractions, "methods": self.s.methods,
                      "constant_threshold_too": self.s.constant_threshold_too,
                      "constant_fractions": self.s.constant_fractions,
                      "host": socket.gethostname(), "pid": os.getpid()}
        self.own_invocations.append(invocation)
        state.update(preset=self.s.preset, dims=self.s.dims)
        self.save_settings(state)
        return state, invocation

    def add_row(self, **row: Any) -> None:
        written = self.sweep.append(row)
        self.reporter.emit("row", table=SWEEP_CSV, **written)
        self.reporter.log(f"{METHOD_NAMES.get(row['method'], row['method'])} at {100 * row['anomalous_fraction']:g} % "
                          f"anomalous: AUROC {100 * row['auroc']:.1f}, AUPRO {100 * row['aupro']:.1f}, "
                          f"best Dice {100 * row['best_dice']:.1f} ({row['seconds']:.0f} s)")

    # -- the sweep ----------------------------------------------------------------------------------------------
    def run(self, command: str = "") -> list[Path]:
        with contextlib.ExitStack() as claims:
            for fraction in self.s.fractions:
                claims.enter_context(fraction_claim(self.out, fraction))
            return self._run(command)

    def _run(self, command: str) -> list[Path]:
        state, invocation = self.start_invocation(command)
        start = time.perf_counter()

        test_dir = ensure_cohort(self.out / "test", self.s.dims, self.s.n_test, TEST_FRACTION, self.s.test_seed,
                                 self.s.size, self.inner, family=self.s.data_family, split=self.s.eval_split)
        from .baselines import METHODS as BASELINE_METHODS
        from iltm.io import list_images

        self.test_records = list_images(test_dir / "images")
        self.labels_dir = test_dir / "labels"
        constant = self.s.constant_fractions if self.s.constant_fractions is not None else self.s.fractions
        tasks = []
        for f in self.s.fractions:
            tasks += [(f, "iltm")] if self.s.runs_iltm else []
            tasks += [(f, "iltm_constant")] if self.s.constant_threshold_too and f in constant else []
            tasks += [(f, m) for m in BASELINE_METHODS if m in self.s.methods]
            tasks += [(f, "intensity")] if "intensity" in self.s.methods else []
        self.reporter.units_total = float(len(tasks))
        self.reporter.emit("start", command="benchmark", out=str(self.out), tasks=len(tasks))
        self.reporter.log(f"benchmark: {len(tasks)} trainings over {len(self.s.fractions)} fractions into {self.out}")
        rows_before = len(self.sweep.rows)
        for i, (fraction, group) in enumerate(self.reporter.track(tasks, "benchmark", units=float(len(tasks)))):
            train_dir = self.fraction_dir(fraction) / "train"
            if group == "iltm":
                self.iltm_task(fraction, train_dir)
            elif group == "iltm_constant":
                self.constant_task(fraction, train_dir)
            elif group == "intensity":
                self.intensity_task(fraction)
            else:
                self.baseline_task(group, fraction, train_dir)
            fraction_done = i < len(tasks) - 1 and tasks[i + 1][0] != fraction
            if fraction_done and len(self.sweep.rows) > rows_before:
                # Partial results are worth a look while the next fraction trains (hours at the larger presets).
                rows_before = len(self.sweep.rows)
                invocation["seconds"] = time.perf_counter() - start
                self.save_settings(state)
                make_figures(self.out, self.reporter, cases=self.s.cases)
        invocation["seconds"] = time.perf_counter() - start
        invocation["finished"] = True
        self.save_settings(state)
        figures = make_figures(self.out, self.reporter, cases=self.s.cases)
        self.reporter.emit("done", out=str(self.out))
        return figures

    def _cohort(self, fraction: float, train_dir: Path) -> Path:
        return ensure_cohort(train_dir, self.s.dims, self.s.n_train, fraction, self.s.seed, self.s.size, self.inner,
                             family=self.s.data_family, split="train")

    def _iterations_of(self, run, schedule: str, fraction: float) -> dict[int, tuple[dict[str, Any], float]]:
        """Test metrics (and test scoring seconds) of every iteration of ``run``, rows written as they come."""
        results = {}
        for record in run.history()["iterations"]:
            k = int(record["iteration"])
            scores_dir = self.fraction_dir(fraction) / "scores" / run.root.name / f"iteration_{k:03d}"
            row = self.iterations.get(threshold_schedule=schedule, anomalous_fraction=fraction, iteration=k)
            timing = scores_dir / "seconds.json"
            if row is not None and timing.is_file():
                results[k] = (_metrics_from_row(row), json.loads(timing.read_text(encoding="utf-8"))["seconds"])
                continue
            self.reporter.log(f"{100 * fraction:g} % anomalous: scoring the test set with {run.root.name} "
                              f"iteration {k}")
            summary, seconds = evaluate_iteration(run, k, self.s, self.test_records, self.labels_dir, scores_dir,
                                                  self.inner)
            metrics = _metric_row(summary)
            if row is None:
                self.iterations.append({"threshold_schedule": schedule, "anomalous_fraction": fraction,
                                        "iteration": k, **metrics,
                                        "resampling_threshold": record.get("resampling_threshold"),
                                        "masked_fraction": record.get("masked_fraction")})
            results[k] = (metrics, seconds)
        return results

    @staticmethod
    def _training_seconds(run, up_to: int, with_last_detection: bool) -> float:
        """VQ-VAE + Transformer fits (+ training-set detections that fed the next iteration) up to iteration k."""
        history = run.history()
        total = float((history.get("vqvae") or {}).get("seconds") or 0.0)
        for rec in history["iterations"]:
            k = rec["iteration"]
            if k > up_to:
                break
            total += float(rec.get("train_seconds") or 0.0)
            if k < up_to or with_last_detection:  # fold fits only serve the training-scan detection
                total += float(rec.get("detect_seconds") or 0.0) + float(rec.get("fold_train_seconds") or 0.0)
        return total

    def iltm_task(self, fraction: float, train_dir: Path) -> None:
        wanted = [m for m in ("vqvae_transformer", "iltm") if m in self.s.methods]
        if all(self.sweep.get(method=m, anomalous_fraction=fraction) for m in wanted):
            return
        self._cohort(fraction, train_dir)
        self.reporter.log(f"{100 * fraction:g} % anomalous: ILTM run (decreasing threshold)")
        run = ensure_run(self.fraction_dir(fraction) / "runs" / "iltm", self.cfg, train_dir, self.inner)
        results = self._iterations_of(run, "decreasing", fraction)
        last = max(results)
        if "vqvae_transformer" in wanted and not self.sweep.get(method="vqvae_transformer",
                                                                anomalous_fraction=fraction):
            metrics, seconds = results[0]
            self.add_row(method="vqvae_transformer", anomalous_fraction=fraction, iteration=0, **metrics,
                         seconds=self._training_seconds(run, 0, with_last_detection=False) + seconds)
        if "iltm" in wanted and not self.sweep.get(method="iltm", anomalous_fraction=fraction):
            metrics, seconds = results[last]
            # The last iteration's detection on the training set only decided to stop; it still had to run.
            self.add_row(method="iltm", anomalous_fraction=fraction, iteration=last, **metrics,
                         seconds=self._training_seconds(run, last, with_last_detection=True) + seconds)
        # The iteration training recorded as best (history.json's best_iteration); runs from before it have none.
        best = run.history().get("best_iteration")
        if "iltm" in wanted and best in results and not self.sweep.get(method="iltm_best", anomalous_fraction=fraction):
            metrics, seconds = results[best]
            self.add_row(method="iltm_best", anomalous_fraction=fraction, iteration=best, **metrics,
                         seconds=self._training_seconds(run, last, with_last_detection=True) + seconds)

    def constant_task(self, fraction: float, train_dir: Path) -> None:
        from iltm.run import RunFolder

        if self.sweep.get(method="iltm_constant", anomalous_fraction=fraction):
            return
        self._cohort(fraction, train_dir)
        runs = self.fraction_dir(fraction) / "runs"
        root = runs / "iltm_constant"
        if not RunFolder(root).manifest_path.is_file() and RunFolder(runs / "iltm").history_path.is_file():
            if root.exists():
                shutil.rmtree(root)
            seed_constant_run(RunFolder(runs / "iltm"), root)
        self.reporter.log(f"{100 * fraction:g} % anomalous: ILTM run (constant threshold)")
        cfg = copy.deepcopy(self.cfg)
        cfg.iltm.constant_threshold = True
        run = ensure_run(root, cfg, train_dir, self.inner)
        results = self._iterations_of(run, "constant", fraction)
        last = max(results)
        metrics, seconds = results[last]
        self.add_row(method="iltm_constant", anomalous_fraction=fraction, iteration=last, **metrics,
                     seconds=self._training_seconds(run, last, with_last_detection=True) + seconds)

    def intensity_task(self, fraction: float) -> None:
        """The test scans' own intensities as their scores: no training, so the same row at every fraction."""
        from iltm.layout import SCORE_SUFFIX
        from iltm.io import read_image, write_image

        if self.sweep.get(method="intensity", anomalous_fraction=fraction):
            return
        scores_dir = self.out / "test" / "scores_intensity"

        def write(missing):
            for rec in missing:
                write_image(read_image(rec.image), scores_dir / f"{rec.id}{SCORE_SUFFIX}")  # float32, as read

        seconds = _timed_scores(scores_dir, self.test_records, write)
        self.add_row(method="intensity", anomalous_fraction=fraction, iteration=None,
                     **_metric_row(metrics_of(scores_dir, self.labels_dir)), seconds=seconds)

    def baseline_task(self, method: str, fraction: float, train_dir: Path) -> None:
        from .baselines import score_files, train_baseline

        if self.sweep.get(method=method, anomalous_fraction=fraction):
            return
        self._cohort(fraction, train_dir)
        self.reporter.log(f"{100 * fraction:g} % anomalous: {METHOD_NAMES[method]}")
        model = train_baseline(method, self.fraction_dir(fraction) / "runs" / f"{method}.pt", self.cfg,
                               self.baseline_cfg, train_dir, self.inner)
        scores_dir = self.fraction_dir(fraction) / "scores" / method
        seconds = _timed_scores(scores_dir, self.test_records,
                                lambda missing: score_files(model, missing, scores_dir, self.inner))
        metrics = _metric_row(metrics_of(scores_dir, self.labels_dir))
        self.add_row(method=method, anomalous_fraction=fraction, iteration=None, **metrics,
                     seconds=float(model.extra.get("train_seconds", 0.0)) + seconds)


# -- figures and table --------------------------------------------------------------------------------------------

def _method_order(methods) -> list[str]:
    known = [m for m in (*METHODS, "iltm_constant") if m in methods]
    return known + sorted(m for m in methods if m not in known)


def _style(method: str) -> dict[str, Any]:
    styles = {"intensity": ("black", "", ":"), "ae": ("tab:gray", "s", "-"), "vae": ("tab:brown", "D", "-"),
              "nsa": ("tab:green", "v", "-"), "cutpaste": ("tab:purple", "P", "-"),
              "vqvae_transformer": ("tab:blue", "^", "-"), "iltm": ("tab:red", "o", "-"),
              "iltm_constant": ("tab:orange", "o", "--")}
    colour, marker, line = styles.get(method, (None, "x", ":"))
    return dict(color=colour, marker=marker, linestyle=line)


def figure4(rows: list[dict[str, Any]], path: Path, title: str = "",
            error_bars: str = "standard deviation over test scans") -> Path:
    """AUROC / AUPRO / best Dice against the anomalous fraction of the training data, one line per method."""
    import matplotlib.pyplot as plt

    from iltm.visualize import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    fig.subplots_adjust(wspace=0.3)  # room for the y labels next to four-digit ticks
    for method in _method_order({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["anomalous_fraction"])
        x = [100 * r["anomalous_fraction"] for r in mine]
        for ax, (key, name) in zip(axes, METRICS):
            y = [100 * r[key] for r in mine]
            err = [100 * (r.get(f"{key}_std") or 0.0) for r in mine]
            err = [0.0 if math.isnan(e) else e for e in err]
            ax.errorbar(x, y, yerr=err, capsize=3, markersize=5, label=METHOD_NAMES.get(method, method),
                        **_style(method))
    for ax, (_, name) in zip(axes, METRICS):
        ax.set(xlabel="anomalous training scans (%)", ylabel=f"{name} (%)", title=name)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the data
    fig.suptitle(title + f"\n(pooled voxel metric; error bars: {error_bars})", fontsize=9, y=1.06)
    save_figure(fig, path)
    return path


def figure3(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """ILTM test metrics per iteration, decreasing (solid) vs constant (dashed) threshold, one colour per fraction."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from iltm.visualize import save_figure

    fractions = sorted({r["anomalous_fraction"] for r in rows})
    cmap = plt.get_cmap("viridis")
    colour = {f: cmap(i / max(len(fractions) - 1, 1)) for i, f in enumerate(fractions)}
    dashes = {"decreasing": "-", "constant": "--"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    fig.subplots_adjust(wspace=0.3)  # room for the y labels next to four-digit ticks
    iterations = set()
    for schedule in ("decreasing", "constant"):
        for f in fractions:
            mine = sorted((r for r in rows if r["threshold_schedule"] == schedule and r["anomalous_fraction"] == f),
                          key=lambda r: r["iteration"])
            if not mine:
                continue
            x = [int(r["iteration"]) for r in mine]
            iterations.update(x)
            for ax, (key, _) in zip(axes, METRICS):
                ax.plot(x, [100 * r[key] for r in mine], marker="o", markersize=4, color=colour[f],
                        linestyle=dashes.get(schedule, ":"))
    for ax, (_, name) in zip(axes, METRICS):
        ax.set(xlabel="ILTM iteration (0 = no masking)", ylabel=f"{name} (%)", title=name)
        ax.set_xticks(sorted(iterations))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour[f], marker="o", label=f"{100 * f:g} % anomalous") for f in fractions]
    handles += [Line2D([], [], color="black", linestyle=d, label=f"{s} threshold") for s, d in dashes.items()
                if any(r["threshold_schedule"] == s for r in rows)]
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the data
    fig.suptitle(title + "\n(test-set metric of each iteration's Transformer)", fontsize=9, y=1.06)
    save_figure(fig, path)
    return path


def figure5(out: Path, rows: list[dict[str, Any]], path: Path, cases: int = 3) -> Path | None:
    """Rows: input, truth, AE residual, VAE residual, ILTM score; columns: anomalous test scans; at the highest
    fraction whose score maps are on disk. ``None`` when there is nothing to draw."""
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    from iltm.io import read_image
    from iltm.layout import SCORE_SUFFIX
    from iltm.visualize import overlay_axes, save_figure, to_view

    manifest_path = out / "test" / "manifest.json"
    if not manifest_path.is_file() or not rows:
        return None
    for fraction in sorted({r["anomalous_fraction"] for r in rows}, reverse=True):
        fdir = out / f"fraction_{fraction_text(fraction)}"
        iltm = [r for r in rows if r["method"] == "iltm" and r["anomalous_fraction"] == fraction]
        maps = {}
        if (fdir / "scores" / "ae").is_dir():
            maps["Dense AE residual"] = fdir / "scores" / "ae"
        if (fdir / "scores" / "vae").is_dir():
            maps["Dense VAE residual"] = fdir / "scores" / "vae"
        if (fdir / "scores" / "nsa").is_dir():
            maps["NSA probability"] = fdir / "scores" / "nsa"
        if (fdir / "scores" / "cutpaste").is_dir():
            maps["CutPaste patch distance"] = fdir / "scores" / "cutpaste"
        if iltm and iltm[0].get("iteration") is not None:
            k = int(iltm[0]["iteration"])
            maps[f"ILTM score (iteration {k})"] = fdir / "scores" / "iltm" / f"iteration_{k:03d}"
        if maps:
            break
    else:
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    subjects = [s for s in manifest["subjects"] if s["anomalous"]][:max(cases, 1)]
    subjects = [s for s in subjects if all((d / f"{s['id']}{SCORE_SUFFIX}").is_file() for d in maps.values())]
    if not subjects:
        return None
    names = ["input", "truth", *maps]
    fig, axes = plt.subplots(len(names), len(subjects), figsize=(2.4 * len(subjects), 2.3 * len(names)),
                             squeeze=False)
    for c, s in enumerate(subjects):
        image = sitk.GetArrayFromImage(read_image(out / "test" / s["image"]))
        truth = sitk.GetArrayFromImage(read_image(out / "test" / s["label"])) > 0.5
        overlay_axes(axes[0, c], image)
        axes[0, c].set_title(s["id"], fontsize=8)
        axes[1, c].imshow(to_view(truth.astype(np.float32)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[1, c].set_axis_off()
        for r, name in enumerate(maps, start=2):
            score = to_view(sitk.GetArrayFromImage(read_image(maps[name] / f"{s['id']}{SCORE_SUFFIX}")))
            lo, hi = np.percentile(score, 1), np.percentile(score, 99.9)
            axes[r, c].imshow(score, cmap="hot", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
            if truth.any():
                axes[r, c].contour(to_view(truth.astype(np.float32)), levels=[0.5], colors="lime", linewidths=0.6)
            axes[r, c].set_axis_off()
    for r, name in enumerate(names):
        axes[r, 0].text(-0.06, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=8)
    fig.suptitle(f"test scans, models trained with {100 * fraction:g} % anomalous scans (truth outlined in green)",
                 fontsize=9)
    save_figure(fig, path)
    return path


def table1(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """Markdown: the metrics at the highest fraction (like the paper's Table 1), the change from the lowest
    fraction, the paper's numbers for orientation, and how the results were made."""
    top = max(r["anomalous_fraction"] for r in rows)
    low = min(r["anomalous_fraction"] for r in rows)
    at = {r["method"]: r for r in rows if r["anomalous_fraction"] == top}
    s = settings.get("settings", {})
    lines = [f"# Table 1: training data {100 * top:g} % anomalous", "",
             f"{data_text(s)}, preset `{s.get('preset', '?')}`, "
             f"{s.get('n_train', '?')} training scans per fraction, {s.get('n_test', '?')} held-out test scans "
             f"(half with lesions).", "",
             "| Method | AUROC | AUPRO | best Dice |", "|---|---|---|---|"]
    for method in _method_order(at):
        r = at[method]
        name = METHOD_NAMES.get(method, method)
        if method.startswith("iltm") and r.get("iteration") is not None:
            name += f" (iteration {int(r['iteration'])})"
        cells = [f"{100 * r[k]:.1f} ± {100 * (r.get(k + '_std') or float('nan')):.1f}" for k, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Metrics in %: voxel-wise, pooled over all test scans, ± the standard deviation of the per-scan "
                  "metric over the test scans (scans without lesions have no per-scan AUPRO or Dice).", ""]
    if top != low:
        before = {r["method"]: r for r in rows if r["anomalous_fraction"] == low}
        lines += [f"## From {100 * low:g} % to {100 * top:g} % anomalous training data", "",
                  f"| Method | AUROC at {100 * low:g} % | AUROC at {100 * top:g} % | change (points) |",
                  "|---|---|---|---|"]
        for method in _method_order(at):
            if method in before:
                a, b = 100 * before[method]["auroc"], 100 * at[method]["auroc"]
                lines.append(f"| {METHOD_NAMES.get(method, method)} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        lines.append("")
    if "iltm" in {r["method"] for r in rows}:
        verdicts = []
        for f in sorted({r["anomalous_fraction"] for r in rows if r["anomalous_fraction"] >= 0.5}):
            here = {r["method"]: r["auroc"] for r in rows if r["anomalous_fraction"] == f}
            others = {m: v for m, v in here.items() if m in BASELINES}
            if "iltm" in here and others:
                beaten = [METHOD_NAMES[m] for m, v in others.items() if v >= here["iltm"]]
                verdicts.append(f"{100 * f:g} %: " + ("ILTM has the highest AUROC" if not beaten else
                                                     "ILTM does not beat " + ", ".join(beaten)))
        if verdicts:
            lines += ["AUROC at fractions of 50 % and above: " + "; ".join(verdicts) + ".", ""]
    lines += ["## The paper's Table 1 (real PET, 100 % anomalous training data), for orientation only", "",
              "| Method | AUROC | AUPRO | Dice |", "|---|---|---|---|"]
    for method, values in PAPER_TABLE1.items():
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    invocations = settings.get("invocations", [])
    if invocations:
        total = sum(float(i.get("seconds") or 0.0) for i in invocations)
        lines += ["", "## How these numbers were made", ""]
        commands = sorted({i.get("command") for i in invocations if i.get("command")})
        lines += [f"    {c}" for c in commands]
        wall = invocations_wall_seconds(invocations)
        overlap = f", {wall / 3600:.2f} h of wall clock (processes ran side by side)" if wall < total - 1 else ""
        lines += ["", f"Time over {len(invocations)} invocation(s): {total / 3600:.2f} h{overlap} "
                      f"(first started {invocations[0].get('started')})."]
    if settings.get("note"):  # what a reader of the numbers must know that the commands do not say
        lines += ["", settings["note"]]
    return "\n".join(lines) + "\n"


def invocations_wall_seconds(invocations: list[dict[str, Any]]) -> float:
    """Seconds of wall clock the invocations covered: overlapping ones (processes sharing a folder) count once."""
    spans = []
    for i in invocations:
        try:
            start = time.mktime(time.strptime(str(i.get("started")), "%Y-%m-%d %H:%M:%S"))
        except ValueError:
            return sum(float(j.get("seconds") or 0.0) for j in invocations)
        spans.append((start, start + float(i.get("seconds") or 0.0)))
    wall, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            wall += b - max(a, end)
            end = b
    return wall


def make_figures(out: str | Path, reporter: Reporter | None = None, cases: int = 3) -> list[Path]:
    """(Re)draw Figures 3, 4, 5 and Table 1 from the CSVs (and the score maps, for Figure 5) in ``out``."""
    from iltm.io import atomic_write_text

    reporter = reporter or Reporter("none")
    out = Path(out)
    rows = read_table(out / SWEEP_CSV)
    iteration_rows = read_table(out / ITERATIONS_CSV)
    if not rows and not iteration_rows:
        raise InputError(out, f"no {SWEEP_CSV} or {ITERATIONS_CSV} with results to draw")
    settings = json.loads((out / SETTINGS_JSON).read_text(encoding="utf-8")) if (out / SETTINGS_JSON).is_file() else {}
    s = settings.get("settings", {})
    title = figure_title(s)
    written = []
    if rows:
        written.append(figure4(rows, out / FIGURE4, title))
        atomic_write_text(out / TABLE1, table1(rows, settings))
        written.append(out / TABLE1)
        fig5 = figure5(out, rows, out / FIGURE5, cases)
        if fig5 is None:
            reporter.log(f"{FIGURE5}: no score maps on disk to draw")
        else:
            written.append(fig5)
    if iteration_rows:
        written.append(figure3(iteration_rows, out / FIGURE3, title))
    for path in written:
        reporter.emit("output", kind="figure" if path.suffix == ".png" else "table", path=str(path))
    return written


# -- several seeds ------------------------------------------------------------------------------------------------

SEEDS_CSV, SEEDS_TABLE, SEEDS_FIGURE = "seed_spread.csv", "seed_spread.md", "figure4_seeds.png"
SEED_COLUMNS = ["method", "anomalous_fraction", "seeds", "auroc", "aupro", "best_dice", "auroc_std", "aupro_std",
                "best_dice_std"]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _read_sweeps(folders: list[Path]) -> list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """(folder, settings, rows) of each sweep; InputError unless they differ in ``--seed`` only."""
    if len(folders) < 2:
        raise InputError("--combine", f"give at least two sweep folders, not {len(folders)}")
    sweeps = []
    for folder in map(Path, folders):
        rows = read_table(folder / SWEEP_CSV)
        if not (folder / SETTINGS_JSON).is_file() or not rows:
            raise InputError(folder, f"not a sweep with results: no {SETTINGS_JSON} or no rows in {SWEEP_CSV}")
        sweeps.append((folder, json.loads((folder / SETTINGS_JSON).read_text(encoding="utf-8")).get("settings", {}), rows))
    first_folder, first, _ = sweeps[0]
    fixed = [k for k in SweepSettings.IDENTITY if k != "seed"]
    for folder, settings, _ in sweeps[1:]:
        differ = [k for k in fixed if settings.get(k) != first.get(k)]
        if differ:
            raise InputError(folder, f"differs from {first_folder} in {', '.join(differ)}; only --seed may differ "
                                     "(the test set, --test-seed, must be the same)")
    seeds = [s.get("seed") for _, s, _ in sweeps]
    if len(set(seeds)) < len(seeds):
        raise InputError("--combine", f"two sweeps have the same seed ({seeds}): they are not independent")
    return sweeps


def combine_seeds(folders: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Mean and standard deviation over sweeps that differ only in their seed (training cohort and training).

    Returns:
        rows in the schema of :data:`SEED_COLUMNS` (``auroc`` = mean over seeds, ``auroc_std`` = their standard
        deviation), one per (method, fraction) that every sweep has; ``paired``: per fraction and baseline the
        differences ILTM minus baseline, seed by seed (``auroc_diff`` list, ``wins`` = seeds where ILTM is higher);
        the seeds.
    """
    sweeps = _read_sweeps(folders)
    by_seed = [{(r["method"], r["anomalous_fraction"]): r for r in rows} for _, _, rows in sweeps]
    common = set.intersection(*(set(d) for d in by_seed))
    order = _method_order({m for m, _ in common})
    common = sorted(common, key=lambda k: (k[1], order.index(k[0])))
    if not common:
        raise InputError("--combine", "the sweeps have no (method, fraction) in common")
    rows = []
    for method, fraction in common:
        row: dict[str, Any] = {"method": method, "anomalous_fraction": fraction, "seeds": len(by_seed)}
        for key, _ in METRICS:
            row[key], row[f"{key}_std"] = _mean_sd([d[(method, fraction)][key] for d in by_seed])
        rows.append(row)
    paired = []
    for fraction in sorted({f for _, f in common}):
        for other in BASELINES:
            if ("iltm", fraction) in common and (other, fraction) in common:
                entry: dict[str, Any] = {"anomalous_fraction": fraction, "method": other}
                for key, _ in METRICS:
                    entry[f"{key}_diff"] = [d[("iltm", fraction)][key] - d[(other, fraction)][key] for d in by_seed]
                entry["wins"] = sum(v > 0 for v in entry["auroc_diff"])
                paired.append(entry)
    return rows, paired, [s.get("seed") for _, s, _ in sweeps]


def seeds_table(rows: list[dict[str, Any]], paired: list[dict[str, Any]], seeds: list[int],
                folders: list[Path], settings: dict[str, Any]) -> str:
    """Markdown: AUROC and best Dice, mean ± standard deviation over seeds, and ILTM's paired differences."""
    methods = _method_order({r["method"] for r in rows})
    at = {(r["method"], r["anomalous_fraction"]): r for r in rows}
    fractions = sorted({r["anomalous_fraction"] for r in rows})
    lines = [f"# Contamination sweep over {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             f"{data_text(settings)}, preset `{settings.get('preset', '?')}`, "
             f"{settings.get('n_train', '?')} training scans per fraction and seed, one held-out test set of "
             f"{settings.get('n_test', '?')} scans (test seed {settings.get('test_seed', '?')}). Sweeps: "
             + ", ".join(f"`{f}`" for f in folders) + ".", "",
             "AUROC / best Dice in %, mean ± standard deviation over the seeds (each seed: its own training "
             "cohort and training):", "",
             "| training data anomalous | " + " | ".join(METHOD_NAMES.get(m, m) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for f in fractions:
        cells = []
        for m in methods:
            r = at.get((m, f))
            cells.append("" if r is None else f"{100 * r['auroc']:.1f} ± {100 * r['auroc_std']:.1f} / "
                                                 f"{100 * r['best_dice']:.1f} ± {100 * r['best_dice_std']:.1f}")
        lines.append(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
    if paired:
        names = [m for m in BASELINES if any(p["method"] == m for p in paired)]
        lines += ["", "ILTM minus each other method, paired by seed (same training cohort), in points: AUROC mean "
                      "± sd (seeds where ILTM's AUROC is higher) / best Dice mean ± sd:", "",
                  "| training data anomalous | " + " | ".join(f"vs {METHOD_NAMES[m]}" for m in names) + " |",
                  "|---|" + "---|" * len(names)]
        by_key = {(p["anomalous_fraction"], p["method"]): p for p in paired}
        for f in sorted({p["anomalous_fraction"] for p in paired}):
            cells = []
            for m in names:
                p = by_key.get((f, m))
                if p is None:
                    cells.append("")
                    continue
                (a, sa), (d, sd) = (_mean_sd([100 * v for v in p[k]]) for k in ("auroc_diff", "best_dice_diff"))
                cells.append(f"{a:+.1f} ± {sa:.1f} ({p['wins']}/{len(seeds)}) / {d:+.1f} ± {sd:.1f}")
            lines.append(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_seed_summary(folders: list[Path], out: Path, reporter: Reporter | None = None) -> list[Path]:
    """``iltm benchmark --combine``: write the seed summary (table, CSV, Figure 4 over seeds) to ``out``."""
    from iltm.io import atomic_path, atomic_write_text

    reporter = reporter or Reporter("none")
    folders = [Path(f) for f in folders]
    rows, paired, seeds = combine_seeds(folders)
    settings = json.loads((folders[0] / SETTINGS_JSON).read_text(encoding="utf-8")).get("settings", {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / SEEDS_CSV) as tmp, Path(tmp).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SEED_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _cell(r[k]) for k in SEED_COLUMNS} for r in rows)
    atomic_write_text(out / SEEDS_TABLE, seeds_table(rows, paired, seeds, folders, settings))
    title = f"{figure_title(settings)}, seeds {seeds}"
    figure4(rows, out / SEEDS_FIGURE, title, error_bars=f"standard deviation over {len(seeds)} training seeds")
    written = [out / SEEDS_CSV, out / SEEDS_TABLE, out / SEEDS_FIGURE]
    for path in written:
        reporter.emit("output", kind="figure" if path.suffix == ".png" else "table", path=str(path))
    return written


# -- command line -------------------------------------------------------------------------------------------------

def add_benchmark_parser(subparsers, common_parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``benchmark`` subcommand; it carries its handler as ``args.handler`` (= :func:`cmd_benchmark`)."""
    help_ = "Contamination sweep: train every method at each anomalous fraction, evaluate, draw Figures 3-5."
    p = subparsers.add_parser("benchmark", help=help_, description=help_, parents=[common_parent], epilog=EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="sweep folder (results, run folders, figures)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D slices or 3D volumes (default 2)")
    p.add_argument("--preset", default="tiny", help="tiny, small or paper, for ILTM and the baselines (default tiny)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                   help="anomalous fractions of the training cohorts (default 0 0.2 0.4 0.6 0.8 1.0)")
    p.add_argument("--n-train", type=int, default=40, help="training scans per fraction (default 40)")
    p.add_argument("--n-test", type=int, default=20, help="held-out test scans, half with lesions (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training cohorts and of training (default 0)")
    p.add_argument("--test-seed", type=int, help="seed of the test cohort (default: seed + 1000)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help=f"methods to run (default all: {' '.join(METHODS)})")
    p.add_argument("--constant-threshold-too", type=float, nargs="*", metavar="FRACTION",
                   help="also run ILTM with a constant resampling threshold (Figure 3, method iltm_constant): at "
                        "every fraction, or only at the FRACTIONs given (e.g. --constant-threshold-too 1.0)")
    p.add_argument("--max-iterations", type=int, help="ILTM iterations after iteration 0 (default from preset)")
    p.add_argument("--size", type=int, nargs="+", help="synthetic image size in voxels (x y [z]); default per --dims")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--test-threshold", choices=("fixed", "iteration"), default="fixed",
                   help="resampling threshold when scoring the test set: the config's t (fixed, as 'iltm detect') "
                        "or each iteration's own decayed t")
    p.add_argument("--data-family", choices=DATA_FAMILIES, default="phantom",
                   help="training and test cohorts: iltm synth's phantom (default), or real textures or anatomy "
                        "(iltm_bench.families: train split for training, test split for the test set; 2D only)")
    p.add_argument("--eval-split", choices=EVAL_SPLITS, default="test",
                   help="the families' split that the held-out cohort comes from: test (default, for reporting) or "
                        "val (for choosing settings; never choose them on test)")
    p.add_argument("--cases", type=int, default=3, help="anomalous test scans shown in Figure 5 (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set vqvae.epochs=10; 'baselines.KEY' for the Dense AE/VAE, "
                        "NSA and CutPaste (e.g. --set baselines.beta=0.5); repeatable")
    p.add_argument("--figures-only", action="store_true", help="only redraw figures and table from the CSVs in --out")
    p.add_argument("--combine", nargs="+", type=Path, metavar="SWEEP",
                   help="only combine finished sweeps that differ in --seed alone: mean and spread over seeds, and "
                        f"ILTM's paired differences, into --out ({SEEDS_TABLE}, {SEEDS_CSV}, {SEEDS_FIGURE})")
    p.set_defaults(handler=cmd_benchmark)
    return p


def settings_from_args(args) -> SweepSettings:
    return SweepSettings(out=args.out, dims=args.dims, preset=args.preset, fractions=list(args.fractions),
                         n_train=args.n_train, n_test=args.n_test, seed=args.seed, test_seed=args.test_seed,
                         methods=list(args.methods), constant_threshold_too=args.constant_threshold_too is not None,
                         constant_fractions=args.constant_threshold_too or None,
                         size=args.size, overrides=list(args.set or []), max_iterations=args.max_iterations,
                         device=args.device, test_threshold=args.test_threshold, cases=args.cases,
                         data_family=args.data_family, eval_split=args.eval_split)


def command_line(settings: SweepSettings) -> str:
    """The ``iltm benchmark`` command that (re)builds this sweep."""
    parts = ["iltm", "benchmark", "--out", str(settings.out), "--dims", str(settings.dims), "--preset",
             settings.preset, "--fractions", *map(fraction_text, settings.fractions), "--n-train",
             str(settings.n_train), "--n-test", str(settings.n_test), "--seed", str(settings.seed)]
    if settings.test_seed != settings.seed + 1000:
        parts += ["--test-seed", str(settings.test_seed)]
    if settings.methods != list(METHODS):
        parts += ["--methods", *settings.methods]
    if settings.constant_threshold_too:
        parts += ["--constant-threshold-too", *map(fraction_text, settings.constant_fractions or [])]
    if settings.max_iterations is not None:
        parts += ["--max-iterations", str(settings.max_iterations)]
    if settings.size:
        parts += ["--size", *map(str, settings.size)]
    if settings.test_threshold != "fixed":
        parts += ["--test-threshold", settings.test_threshold]
    if settings.data_family != "phantom":
        parts += ["--data-family", settings.data_family]
    if settings.eval_split != "test":
        parts += ["--eval-split", settings.eval_split]
    for item in settings.overrides:
        parts += ["--set", item]
    return shlex.join(parts)


def cmd_benchmark(args, reporter: Reporter) -> int:
    if args.combine:
        for path in write_seed_summary(args.combine, args.out, reporter):
            reporter.log(f"wrote {path}")
        if reporter.mode != "jsonl":
            print((Path(args.out) / SEEDS_TABLE).read_text(encoding="utf-8"))
        return 0
    if args.figures_only:
        for path in make_figures(args.out, reporter, cases=args.cases):
            reporter.log(f"wrote {path}")
        return 0
    settings = settings_from_args(args)
    figures = Sweep(settings, reporter).run(command=command_line(settings))
    if reporter.mode != "jsonl" and (settings.out / TABLE1).is_file():
        print((settings.out / TABLE1).read_text(encoding="utf-8"))
    for path in figures:
        reporter.log(f"wrote {path}")
    return 0
