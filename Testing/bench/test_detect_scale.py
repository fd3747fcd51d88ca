"""iltm_bench/detect_scale.py: a smoke run with two S, and the old path's healing in one batch."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def detect_scale():
    return importlib.import_module("iltm_bench.detect_scale")


def _table(out):
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line and not line.startswith("#")}


def test_a_smoke_run_prints_every_stage_for_every_column(detect_scale, capsys):
    detect_scale.main(["--dims", "2", "--size", "32", "32", "--preset", "tiny", "--samples", "2", "5",
                       "--passes", "2", "--columns", "new-float32", "old-float32"])
    rows = _table(capsys.readouterr().out)
    for stage in ("encode", "likelihood", "resampling", "decoding", "KDE", "total"):
        assert len(rows[stage]) == 8, stage  # seconds and MB of 4 columns
    # The old path heals all S in one batch; at this size the new one's batch is all S too.
    assert rows["heal"][1:] == ["2", "2", "5", "5"]


def test_no_decoding_stops_after_resampling(detect_scale, capsys):
    detect_scale.main(["--dims", "2", "--size", "32", "32", "--preset", "tiny", "--samples", "2", "--passes", "1",
                       "--columns", "new-float32", "--no-decoding"])
    rows = _table(capsys.readouterr().out)
    assert "resampling" in rows and "decoding" not in rows and "KDE" not in rows


def test_static_steps_add_a_capture_stage_the_eager_path_has_not(detect_scale, capsys, monkeypatch):
    from iltm.transformer import TokenTransformer

    detect_scale.main(["--dims", "2", "--size", "32", "32", "--preset", "tiny", "--samples", "3", "--passes", "1",
                       "--columns", "new-float32", "eager-float32", "--no-decoding"])
    assert "capture" not in _table(capsys.readouterr().out)  # on a CPU the new path is eager too
    default, static_steps, made = TokenTransformer.heal_steps, TokenTransformer._static_steps, []
    heal_batch, healed_with = TokenTransformer._heal_batch, []
    monkeypatch.setattr(TokenTransformer, "heal_steps", lambda self, steps=None: default(self, steps or "static"))
    monkeypatch.setattr(TokenTransformer, "_static_steps",
                        lambda self, *a: made.append(a) or static_steps(self, *a))
    monkeypatch.setattr(TokenTransformer, "_heal_batch",
                        lambda self, *a: healed_with.append(a[-1] is not None) or heal_batch(self, *a))
    detect_scale.main(["--dims", "2", "--size", "32", "32", "--preset", "tiny", "--samples", "3", "--passes", "1",
                       "--columns", "new-float32", "eager-float32", "--no-decoding"])
    rows = _table(capsys.readouterr().out)
    assert len(rows["capture"]) == 4 and rows["capture"][2:] == ["0.00", "0"]  # the eager column captured nothing
    # The new column made its steps before the timed healing, which then found them kept (the same arguments).
    assert made[0] == (3, 1.0, "static") and all(a == made[0] for a in made) and len(made) >= 2
    # Both columns healed (through static steps and eagerly) and timed it; a fast CPU may round the time to 0.00.
    assert True in healed_with and False in healed_with
    assert float(rows["resampling"][0]) >= 0 and float(rows["resampling"][2]) >= 0
