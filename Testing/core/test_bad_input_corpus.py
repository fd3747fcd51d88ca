"""Every command against the bad-input corpus (Testing/core/bad_inputs.py): exit 2, exactly one ``iltm: error:``
line naming the problem, no traceback, and no new file anywhere (nor above the test's folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bad_inputs import ADAPTERS, COMMANDS, KINDS, PROBES, Context, unmount_all
from cli_helpers import cli_subprocess
from iltm.cli import main

CASES = [(command, probe) for command in COMMANDS for probe in PROBES if probe.kind in KINDS[command]]


def tree(*roots: Path) -> set:
    """Every path under ``roots`` (as bytes, so undecodable names count too), plus the roots' parents' entries."""
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(bytes(root)):
            found.update(os.path.join(folder, name) for name in dirs + files)
        found.update(os.path.join(bytes(root.parent), name) for name in os.listdir(bytes(root.parent)))
    return found


def run_probe(argv: list, in_subprocess: bool, capfd) -> tuple[int, str]:
    if in_subprocess:
        proc = cli_subprocess(*argv, "--progress", "none")
        return proc.returncode, proc.stderr
    capfd.readouterr()
    code = main([str(a) for a in argv] + ["--progress", "none"])
    return code, capfd.readouterr().err


@pytest.mark.parametrize("command,probe", CASES, ids=[f"{c}-{p.name}" for c, p in CASES])
def test_bad_input_corpus(command, probe, cohort2d, run2d, tmp_path, capfd):
    ctx = Context(tmp=tmp_path / "probe", cohort=cohort2d, run=run2d)
    ctx.tmp.mkdir()
    try:
        bad = probe.make(ctx)
        if bad is None:
            pytest.skip(f"{probe.name}: this machine does not let the test mount a file system")
        argv = ADAPTERS[command](ctx, probe.kind, bad)
        if argv is None:
            pytest.skip(f"{command} takes nothing of kind {probe.kind!r}")
        before = tree(ctx.tmp, run2d)
        code, stderr = run_probe(argv, probe.subprocess, capfd)
        after = tree(ctx.tmp, run2d)
    finally:
        unmount_all(ctx)
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("iltm: error:")]
    assert len(errors) == 1, stderr
    assert (ctx.expect or probe.expect) in errors[0], errors[0]
    assert after == before, f"new files: {sorted(after - before)[:5]}"


def test_every_command_has_an_adapter_and_every_kind_a_command():
    assert set(ADAPTERS) == set(COMMANDS) == set(KINDS)
    kinds = {p.kind for p in PROBES}
    assert kinds == {"image", "run", "checkpoint", "out", "setting", "csv", "name"}
    assert {"train", "detect", "evaluate", "report"} <= set(COMMANDS)
