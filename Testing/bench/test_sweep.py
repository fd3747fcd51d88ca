"""``iltm benchmark``: a tiny 2D contamination sweep of two fractions (every method, both threshold schedules), its
CSV files, figures and table, resuming without redoing rows, redoing exactly a removed row, and bad input."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimage
import pytest
import torch

from iltm_bench.sweep import (FIGURE3, FIGURE4, FIGURE5, ITERATION_COLUMNS, ITERATIONS_CSV, METHOD_NAMES,
                            SWEEP_COLUMNS, SWEEP_CSV, TABLE1, add_benchmark_parser, cmd_benchmark, data_text,
                            make_figures, table1)
from iltm.errors import InputError
from iltm.progress import Reporter

torch.set_num_threads(1)

FAST = ["--set", "vqvae.epochs=3", "--set", "transformer.epochs=3", "--set", "detection.samples=4",
        "--set", "detection.dropout_passes=2", "--set", "data.augment=false", "--set", "baselines.epochs=3",
        "--set", "baselines.nsa_epochs=3", "--set", "baselines.cutpaste_epochs=3",
        "--device", "cpu"]
ALL_METHODS = ["intensity", "ae", "vae", "nsa", "cutpaste", "vqvae_transformer", "iltm", "iltm_constant",
               "iltm_best"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="iltm")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--progress", default="none")
    add_benchmark_parser(sub, common)
    return parser.parse_args(["benchmark", *map(str, argv)])


def sweep_args(out: Path, *extra: str) -> argparse.Namespace:
    return parse("--out", out, "--dims", "2", "--preset", "tiny", "--fractions", "0", "1", "--n-train", "6",
                 "--n-test", "4", "--size", "32", "32", "--seed", "0", "--max-iterations", "1",
                 "--constant-threshold-too", *FAST, *extra)


def run_sweep(out: Path, *extra: str) -> int:
    args = sweep_args(out, *extra)
    return args.handler(args, Reporter("none"))


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def stamps(folder: Path) -> dict[str, int]:
    """Modification times of every model file and score map under ``folder``."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.suffix in (".pt", ".gz", ".npy")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "sweep"
    assert run_sweep(out) == 0
    return out


def test_sweep_csv_has_the_columns_and_one_row_per_method_and_fraction(sweep):
    columns, rows = read_csv(sweep / SWEEP_CSV)
    assert columns == SWEEP_COLUMNS
    assert sorted((r["method"], r["anomalous_fraction"]) for r in rows) == \
        sorted((m, f) for m in ALL_METHODS for f in ("0", "1"))
    for r in rows:
        for key in ("auroc", "aupro", "best_dice"):
            assert 0.0 <= float(r[key]) <= 1.0, r
            assert float(r[key + "_std"]) >= 0.0
        assert float(r["seconds"]) > 0
        if r["method"] in ("intensity", "ae", "vae", "nsa", "cutpaste"):
            assert r["iteration"] == ""
        elif r["method"] == "vqvae_transformer":
            assert r["iteration"] == "0"
        else:
            assert int(r["iteration"]) >= 0


def test_the_intensity_reference_scores_each_test_scan_by_its_own_intensity(sweep):
    import SimpleITK as sitk

    from iltm.evaluate import summarise
    from iltm.io import list_images

    _, rows = read_csv(sweep / SWEEP_CSV)
    mine = {r["anomalous_fraction"]: r for r in rows if r["method"] == "intensity"}
    records = list_images(sweep / "test" / "images")
    images = [sitk.GetArrayFromImage(sitk.ReadImage(str(r.image))) for r in records]
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(sweep / "test" / "labels" / Path(r.image).name))) > 0.5
              for r in records]
    expected = summarise(images, labels)
    for key in ("auroc", "aupro", "best_dice"):
        assert float(mine["0"][key]) == float(mine["1"][key]) == pytest.approx(float(expected[key]), abs=1e-6)
    assert len(list((sweep / "test" / "scores_intensity").glob("*_score.nii.gz"))) == len(records)


def test_iteration_csv_matches_the_runs_and_the_sweep_rows(sweep):
    columns, rows = read_csv(sweep / ITERATIONS_CSV)
    assert columns[:6] == ["threshold_schedule", "anomalous_fraction", "iteration", "auroc", "aupro", "best_dice"]
    assert columns == ITERATION_COLUMNS
    _, sweep_rows = read_csv(sweep / SWEEP_CSV)
    by_method = {(r["method"], r["anomalous_fraction"]): r for r in sweep_rows}
    for schedule, method in (("decreasing", "iltm"), ("constant", "iltm_constant")):
        for fraction in ("0", "1"):
            mine = sorted((r for r in rows if r["threshold_schedule"] == schedule and
                           r["anomalous_fraction"] == fraction), key=lambda r: int(r["iteration"]))
            last = int(by_method[(method, fraction)]["iteration"])
            assert [int(r["iteration"]) for r in mine] == list(range(last + 1))
            assert mine[-1]["auroc"] == by_method[(method, fraction)]["auroc"]
            if schedule == "decreasing":
                assert mine[0]["auroc"] == by_method[("vqvae_transformer", fraction)]["auroc"]
            if last >= 1:
                t1 = float(mine[1]["resampling_threshold"])
                t0 = float(mine[0]["resampling_threshold"])
                # The CSV holds six decimals (in 2D t is a quantile of the cohort, not a round 0.1).
                assert t1 == pytest.approx(t0 if schedule == "constant" else t0 * 0.875, abs=1e-6)


def test_the_best_iteration_row_is_that_iterations_test_scores(sweep):
    _, rows = read_csv(sweep / SWEEP_CSV)
    _, iterations = read_csv(sweep / ITERATIONS_CSV)
    for fraction in ("0", "1"):
        history = json.loads((sweep / f"fraction_{fraction}" / "runs" / "iltm" / "history.json").read_text())
        best = [r for r in rows if r["method"] == "iltm_best" and r["anomalous_fraction"] == fraction][0]
        assert int(best["iteration"]) == history["best_iteration"]
        same = [r for r in iterations if r["threshold_schedule"] == "decreasing"
                and r["anomalous_fraction"] == fraction and r["iteration"] == best["iteration"]][0]
        assert best["auroc"] == same["auroc"] and best["best_dice"] == same["best_dice"]


def test_constant_threshold_run_starts_from_the_decreasing_runs_iteration_0(sweep):
    runs = sweep / "fraction_1" / "runs"
    for name in ("vqvae.pt", "iteration_000/transformer.pt"):
        assert (runs / "iltm" / name).read_bytes() == (runs / "iltm_constant" / name).read_bytes()
    assert "constant_threshold: true" in (runs / "iltm_constant" / "config.yaml").read_text(encoding="utf-8")


def test_table1_names_the_data_family_and_split():
    rows = [{"method": "intensity", "anomalous_fraction": 1.0, "auroc": 0.9, "aupro": 0.8, "best_dice": 0.5}]
    phantom = table1(rows, {"settings": {"dims": 2, "preset": "tiny"}})  # a sweep made before the families
    assert "Synthetic PET-like 2D data, preset `tiny`" in phantom
    texture = table1(rows, {"settings": {"dims": 2, "preset": "tiny", "data_family": "texture", "eval_split": "val"}})
    assert "Texture photographs" in texture and "(validation split)" in texture and "PET" not in texture.split("\n")[2]
    assert data_text({"dims": 2, "data_family": "anatomy"}) == "MNI152 template slices made FDG-PET-like, 2D data"


def test_figures_and_table_are_written(sweep):
    for name in (FIGURE3, FIGURE4, FIGURE5):
        picture = mpimage.imread(sweep / name)
        assert picture.ndim == 3 and picture.shape[0] > 200 and picture.shape[1] > 200, name
    table = (sweep / TABLE1).read_text(encoding="utf-8")
    assert "training data 100 % anomalous" in table
    for method in ALL_METHODS:
        assert f"| {METHOD_NAMES[method]}" in table
    assert " ± " in table and "iltm benchmark --out" in table


def test_rerun_redoes_nothing(sweep):
    before_csv = {name: (sweep / name).read_text(encoding="utf-8") for name in (SWEEP_CSV, ITERATIONS_CSV)}
    before_files = stamps(sweep)
    assert run_sweep(sweep) == 0
    assert {name: (sweep / name).read_text(encoding="utf-8") for name in (SWEEP_CSV, ITERATIONS_CSV)} == before_csv
    assert stamps(sweep) == before_files


def test_a_removed_row_is_redone_and_nothing_else(sweep):
    path = sweep / SWEEP_CSV
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("vae,1,")]
    assert len(kept) == len(lines) - 1
    path.write_text("".join(kept))
    shutil.rmtree(sweep / "fraction_1" / "scores" / "vae")
    before_files = stamps(sweep)
    assert run_sweep(sweep) == 0
    _, rows = read_csv(path)
    assert len(rows) == len(lines) - 1
    assert path.read_text(encoding="utf-8").startswith("".join(kept))          # old rows untouched, the missing one appended
    assert rows[-1]["method"] == "vae" and rows[-1]["anomalous_fraction"] == "1"
    after = stamps(sweep)
    assert {k: v for k, v in after.items() if k in before_files} == before_files  # models reused, not retrained
    assert sorted(set(after) - set(before_files)) == sorted(
        f"fraction_1/scores/vae/{case}_score.nii.gz" for case in ("case000", "case001", "case002", "case003"))


def test_figures_only_redraws_from_the_csvs(sweep):
    for name in (FIGURE3, FIGURE4, FIGURE5, TABLE1):
        (sweep / name).unlink()
    record = json.loads((sweep / "benchmark.json").read_text(encoding="utf-8"))
    (sweep / "benchmark.json").write_text(json.dumps({**record, "note": "Ran on a cold Tuesday."}))
    args = parse("--out", sweep, "--figures-only")
    assert cmd_benchmark(args, Reporter("none")) == 0
    for name in (FIGURE3, FIGURE4, FIGURE5, TABLE1):
        assert (sweep / name).is_file() and (sweep / name).stat().st_size > 0
    assert "Ran on a cold Tuesday." in (sweep / TABLE1).read_text(encoding="utf-8")


def test_tables_are_written_under_an_ascii_locale(sweep, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in (SWEEP_CSV, ITERATIONS_CSV, "benchmark.json"):
        shutil.copy2(sweep / name, folder / name)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, "-m", "iltm", "benchmark", "--out", str(folder), "--figures-only",
                           "--progress", "none"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\u00b1" in (folder / TABLE1).read_text(encoding="utf-8")


def test_other_settings_in_the_same_folder_are_refused(sweep):
    with pytest.raises(InputError, match="n_train"):
        args = parse("--out", sweep, "--dims", "2", "--fractions", "0", "1", "--n-train", "7", "--n-test", "4",
                     "--size", "32", "32", *FAST)
        cmd_benchmark(args, Reporter("none"))


@pytest.mark.parametrize("argv, where", [
    (["--fractions", "0", "1.5"], "--fractions"),
    (["--n-train", "1"], "--n-train"),
    (["--n-test", "1"], "--n-test"),
    (["--set", "vqvae.epochs"], "--set"),
    (["--set", "baselines.no_such=1"], "--set"),
])
def test_bad_arguments_are_input_errors(tmp_path, argv, where):
    args = parse("--out", tmp_path / "x", *argv)
    with pytest.raises(InputError, match=where):
        cmd_benchmark(args, Reporter("none"))


def test_figures_only_without_results_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no contamination_sweep.csv"):
        make_figures(tmp_path)


def test_constant_threshold_fractions_and_the_recorded_command_round_trip(tmp_path):
    from iltm_bench.sweep import command_line, settings_from_args

    args = parse("--out", tmp_path / "x", "--fractions", "0", "0.5", "1", "--constant-threshold-too", "1",
                 "--set", "vqvae.epochs=2", "--size", "32", "32")
    settings = settings_from_args(args)
    assert settings.constant_threshold_too and settings.constant_fractions == [1.0]
    again = settings_from_args(parse(*command_line(settings).split()[2:]))
    assert again == settings
    everywhere = settings_from_args(parse("--out", tmp_path / "x", "--constant-threshold-too"))
    assert everywhere.constant_threshold_too and everywhere.constant_fractions is None
    assert not settings_from_args(parse("--out", tmp_path / "x")).constant_threshold_too
    with pytest.raises(InputError, match="not among"):
        settings_from_args(parse("--out", tmp_path / "x", "--fractions", "0", "1", "--constant-threshold-too", "0.5"))


def test_processes_sharing_a_folder_keep_each_others_invocations_and_rows(tmp_path):
    from iltm_bench.sweep import ResultTable, Sweep, settings_from_args

    out = tmp_path / "shared"
    one = Sweep(settings_from_args(parse("--out", out, "--fractions", "0", "0.2", *FAST)), Reporter("none"))
    two = Sweep(settings_from_args(parse("--out", out, "--fractions", "0.4", *FAST)), Reporter("none"))
    state_one, first = one.start_invocation("first")
    state_two, second = two.start_invocation("second")  # read the folder before the first one finishes
    first["finished"] = True
    one.save_settings(state_one)
    second["seconds"] = 5.0
    two.save_settings(state_two)  # must not drop the first process's finished record
    recorded = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))["invocations"]
    assert [i["command"] for i in recorded] == ["first", "second"]
    assert recorded[0].get("finished") is True and recorded[1]["seconds"] == 5.0
    # Both append rows to one CSV: one header, every row, whichever wrote first.
    a = ResultTable(out / SWEEP_CSV, SWEEP_COLUMNS, ("method", "anomalous_fraction"))
    b = ResultTable(out / SWEEP_CSV, SWEEP_COLUMNS, ("method", "anomalous_fraction"))
    a.append({"method": "ae", "anomalous_fraction": 0.0, "auroc": 0.9})
    b.append({"method": "ae", "anomalous_fraction": 0.4, "auroc": 0.8})
    fields, rows = read_csv(out / SWEEP_CSV)
    assert fields == SWEEP_COLUMNS and [r["anomalous_fraction"] for r in rows] == ["0", "0.4"]
    assert ResultTable(out / SWEEP_CSV, SWEEP_COLUMNS, ("method", "anomalous_fraction")).get(
        method="ae", anomalous_fraction=0.4)["auroc"] == "0.800000"


def test_saving_keeps_what_others_wrote_to_benchmark_json_meanwhile(tmp_path):
    from iltm_bench.sweep import Sweep, settings_from_args

    out = tmp_path / "shared"
    sweep = Sweep(settings_from_args(parse("--out", out, "--fractions", "0", *FAST)), Reporter("none"))
    state, invocation = sweep.start_invocation("mine")
    on_disk = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    on_disk["note"] = "written by hand while the sweep ran"
    (out / "benchmark.json").write_text(json.dumps(on_disk), encoding="utf-8")
    invocation["finished"] = True
    sweep.save_settings(state)  # this process read the file before the note existed
    saved = json.loads((out / "benchmark.json").read_text(encoding="utf-8"))
    assert saved["note"] == "written by hand while the sweep ran"
    assert saved["settings"] == sweep.s.identity() and saved["invocations"][0]["finished"] is True


def test_a_fraction_another_process_is_running_is_a_clear_error(tmp_path):
    from iltm_bench.sweep import Sweep, fraction_claim, settings_from_args

    out = tmp_path / "shared"
    with fraction_claim(out, 0.6):  # held as another process would hold it (its own open file)
        with fraction_claim(out, 0.4):  # another fraction of the same folder is free
            pass
        sweep = Sweep(settings_from_args(parse("--out", out, "--fractions", "0.4", "0.6", *FAST)), Reporter("none"))
        with pytest.raises(InputError, match=rf"fraction 0.6 is being run by process {os.getpid()} .*--fractions"):
            sweep.run("second")
        assert not (out / "benchmark.json").exists()  # refused before doing anything
    with fraction_claim(out, 0.6):  # released: free again
        pass


def test_the_folder_lock_excludes_another_holder(tmp_path):
    import threading
    import time

    from iltm_bench.sweep import folder_lock

    events, held = [], threading.Event()

    def first():
        with folder_lock(tmp_path / "test"):
            events.append("first in")
            held.set()
            time.sleep(0.3)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with folder_lock(tmp_path / "test"):
        events.append("second in")
    thread.join()
    assert events == ["first in", "first out", "second in"]


def test_two_processes_starting_together_share_one_test_cohort(tmp_path, monkeypatch):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import iltm.synth
    from iltm_bench.sweep import ensure_cohort

    real, inside, calls, lock = iltm.synth.make_cohort, [], [], threading.Lock()

    def slow_make_cohort(*args, **kwargs):  # a generation long enough for the other to arrive meanwhile
        with lock:
            inside.append(1)
            calls.append(len(inside))
        time.sleep(0.3)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside.pop()

    monkeypatch.setattr(iltm.synth, "make_cohort", slow_make_cohort)
    folder = tmp_path / "sweep" / "test"
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: ensure_cohort(folder, 2, 4, 0.5, 1000, [32, 32], Reporter("none")), range(2)))
    assert done == [folder, folder]
    assert calls == [1]  # generated once, by one of them; the other waited and took it
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["n"] == 4 and all((folder / s["image"]).is_file() for s in manifest["subjects"])


def test_wall_time_counts_processes_running_side_by_side_once():
    from iltm_bench.sweep import invocations_wall_seconds

    runs = [{"started": "2026-11-29 10:00:00", "seconds": 600.0},   # 10:00-10:10
            {"started": "2026-11-29 10:05:00", "seconds": 600.0},   # 10:05-10:15, overlaps the first
            {"started": "2026-11-29 10:06:00", "seconds": 60.0},    # inside both
            {"started": "2026-11-29 11:00:00", "seconds": 100.0}]   # later, alone
    assert invocations_wall_seconds(runs) == 900.0 + 100.0
    assert invocations_wall_seconds([{"started": "not a time", "seconds": 5.0}, {"seconds": 7.0}]) == 12.0


# -- combining sweeps over seeds (no training: sweep folders written by hand) ------------------------------------

def fake_sweep(folder: Path, seed: int, auroc: dict[tuple[str, float], float], **settings) -> Path:
    """A finished sweep folder whose AUROC is ``auroc[(method, fraction)]`` and best Dice half of it."""
    folder.mkdir(parents=True)
    identity = {"dims": 2, "preset": "tiny", "n_train": 48, "n_test": 20, "seed": seed, "test_seed": 1000,
                "size": None, "overrides": [], "max_iterations": None, "test_threshold": "fixed", **settings}
    (folder / "benchmark.json").write_text(json.dumps({"settings": identity, "invocations": []}))
    with (folder / SWEEP_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS)
        writer.writeheader()
        for (method, fraction), value in auroc.items():
            writer.writerow({"method": method, "anomalous_fraction": fraction, "auroc": value, "aupro": value,
                             "best_dice": value / 2, "auroc_std": 0.01, "aupro_std": 0.01, "best_dice_std": 0.01})
    return folder


def three_seeds(tmp_path: Path) -> list[Path]:
    values = {0: (0.90, 0.95), 1: (0.92, 0.91), 2: (0.94, 0.93)}  # seed: (vae, iltm) at 100 %
    return [fake_sweep(tmp_path / f"seed{s}", s, {("vae", 1.0): vae, ("iltm", 1.0): iltm, ("iltm", 0.0): 0.99,
                                                   ("ae", 0.0): 0.5 + s / 10})
            for s, (vae, iltm) in values.items()]


def test_combined_seeds_give_means_spreads_and_paired_wins(tmp_path):
    folders = three_seeds(tmp_path)
    args = parse("--out", tmp_path / "combined", "--combine", *folders)
    assert cmd_benchmark(args, Reporter("none")) == 0
    _, rows = read_csv(tmp_path / "combined" / "seed_spread.csv")
    got = {(r["method"], float(r["anomalous_fraction"])): r for r in rows}
    assert set(got) == {("vae", 1.0), ("iltm", 1.0), ("iltm", 0.0), ("ae", 0.0)}
    assert float(got[("iltm", 1.0)]["auroc"]) == pytest.approx(0.93)
    assert float(got[("iltm", 1.0)]["auroc_std"]) == pytest.approx(0.02)  # sample sd of .95 .91 .93
    assert float(got[("ae", 0.0)]["auroc_std"]) == pytest.approx(0.1)
    assert float(got[("vae", 1.0)]["best_dice"]) == pytest.approx(0.46)
    assert int(got[("vae", 1.0)]["seeds"]) == 3
    table = (tmp_path / "combined" / "seed_spread.md").read_text(encoding="utf-8")
    assert "over 3 seeds (0, 1, 2)" in table
    assert "| 100 % |  | 92.0 ± 2.0 / 46.0 ± 1.0 | 93.0 ± 2.0 / 46.5 ± 1.0 |" in table
    # ILTM - VAE per seed: +5, -1, -1 points: higher in 1 of 3 seeds
    assert "+1.0 ± 3.5 (1/3)" in table
    assert (tmp_path / "combined" / "figure4_seeds.png").stat().st_size > 0


def test_only_what_every_seed_has_is_combined(tmp_path):
    folders = three_seeds(tmp_path)
    extra = fake_sweep(tmp_path / "seed3", 3, {("iltm", 1.0): 0.9})
    from iltm_bench.sweep import combine_seeds

    rows, paired, seeds = combine_seeds([*folders, extra])
    assert [(r["method"], r["anomalous_fraction"]) for r in rows] == [("iltm", 1.0)]
    assert paired == [] and seeds == [0, 1, 2, 3]


@pytest.mark.parametrize("change, match", [
    (dict(n_train=40), "seed1: differs from .* in n_train"),
    (dict(test_seed=1001), "in test_seed"),
    (dict(seed=0), "same seed"),
])
def test_sweeps_that_differ_in_more_than_the_seed_are_refused(tmp_path, change, match):
    first = fake_sweep(tmp_path / "seed0", 0, {("iltm", 1.0): 0.9})
    second = fake_sweep(tmp_path / "seed1", change.pop("seed", 1), {("iltm", 1.0): 0.9}, **change)
    args = parse("--out", tmp_path / "combined", "--combine", first, second)
    with pytest.raises(InputError, match=match):
        cmd_benchmark(args, Reporter("none"))
    assert not (tmp_path / "combined" / "seed_spread.csv").exists()


def test_combining_one_sweep_or_an_empty_folder_is_refused(tmp_path):
    first = fake_sweep(tmp_path / "seed0", 0, {("iltm", 1.0): 0.9})
    with pytest.raises(InputError, match="at least two"):
        cmd_benchmark(parse("--out", tmp_path / "c", "--combine", first), Reporter("none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: not a sweep with results"):
        cmd_benchmark(parse("--out", tmp_path / "c", "--combine", first, tmp_path / "empty"), Reporter("none"))
