"""The background-job protocol: JSON-lines progress parsed, other lines tolerated, cancel, one-line failures.

These run against ``fake_iltm.py`` (same arguments, same protocol, no model) so they take seconds;
``test_real_cli.py`` repeats the essentials with the real ``iltm``.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from ILTMAnomalyLib import jobs


def test_parse_line_reads_events_and_tolerates_anything_else():
    assert jobs.parse_line('{"event": "progress", "stage": "detect", "done": 1, "total": 4, "fraction": 0.25}\n') == {
        "event": "progress", "stage": "detect", "done": 1, "total": 4, "fraction": 0.25}
    assert jobs.parse_line("detect:  50%|#####     | 2/4")["event"] == "text"
    assert jobs.parse_line('{"no event key": 1}')["event"] == "text"
    assert jobs.parse_line("{broken json")["event"] == "text"
    assert jobs.parse_line("[1, 2]")["event"] == "text"


def test_child_environment_makes_the_bundled_core_importable():
    env = jobs.child_environment({"EXTRA": "1"})
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(jobs.CORE_PARENT)
    assert (jobs.CORE_PARENT / "iltm").is_dir()
    assert env["PYTHONUNBUFFERED"] == "1" and env["EXTRA"] == "1"


def test_command_runs_the_core_as_a_module():
    assert jobs.iltm_command("/usr/bin/python3") == ["/usr/bin/python3", "-m", "iltm"]
    # Outside Slicer (no slicer.app) the child uses this interpreter.
    assert jobs.python_executable() == sys.executable


def _train_args(tmp_path, pet_file):
    return ["train", "--data", str(pet_file.parent), "--out", str(tmp_path / "run"), "--max-iterations", "2"]


def test_progress_iterations_and_completion_are_parsed(tmp_path, pet_file, fake_cli):
    seen = []
    job = jobs.CliJob(_train_args(tmp_path, pet_file), command=fake_cli, on_event=seen.append)
    assert job.args[-2:] == ["--progress", "jsonl"]
    fractions = []
    job.start()
    assert job.state is jobs.JobState.RUNNING and job.pid
    while not job.finished:
        job.poll()
        if job.fraction is not None:
            fractions.append(job.fraction)
        time.sleep(0.01)
    assert job.state is jobs.JobState.SUCCEEDED and job.returncode == 0
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [e["iteration"] for e in job.iterations] == [0, 1, 2]
    # stdout (the JSON events) and stderr are read from two pipes, so how their lines interleave is up to the OS:
    # the order is checked on the events alone.
    kinds = [e["event"] for e in seen if e["event"] != "stderr"]
    assert kinds[0] == "start" and "progress" in kinds and "done" in kinds and kinds[-1] == "exit"
    # tqdm-like stderr lines and a stray print were kept for the log, not mistaken for events.
    assert any(e["event"] == "stderr" for e in seen) and any(e["event"] == "text" for e in seen)
    assert any(line.startswith("Iteration 2:") for line in job.log)
    assert job.error_message is None


def test_failure_reports_the_cli_error_line(tmp_path, pet_file, fake_cli):
    job = jobs.CliJob(_train_args(tmp_path, pet_file), command=fake_cli, env={"FAKE_ILTM_FAIL": "1"}).start()
    assert job.wait(timeout=60) is jobs.JobState.FAILED
    assert job.returncode == 2
    assert job.error_message == f"{pet_file.parent}: no readable images in this folder"


def test_a_crash_without_error_line_still_gives_one_line(tmp_path, pet_file, fake_cli):
    args = ["detect", "--run", str(tmp_path), "--input", str(pet_file), "--out", str(tmp_path / "out")]
    (tmp_path / "config.yaml").write_text("preset: tiny\n")
    job = jobs.CliJob(args, command=fake_cli, env={"FAKE_ILTM_CRASH": "1"}).start()
    assert job.wait(timeout=60) is jobs.JobState.FAILED
    assert job.error_message.startswith("iltm failed with exit code 1.")
    assert "RuntimeError: simulated crash" in job.error_message


def test_cancel_stops_the_process(tmp_path, pet_file, fake_cli):
    job = jobs.CliJob(_train_args(tmp_path, pet_file), command=fake_cli, env={"FAKE_ILTM_SLEEP": "30"}).start()
    pid = job.pid
    deadline = time.monotonic() + 30
    while not any(e["event"] == "start" for e in job.poll()) and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    job.cancel(grace_seconds=5, wait=True)
    assert time.monotonic() - started < 10
    assert job.state is jobs.JobState.CANCELLED and job.error_message == "Cancelled."
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "run" / "vqvae.pt").exists()


def test_cancel_kills_a_process_that_ignores_terminate(tmp_path):
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import signal, sys, time\n"
                        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        "print('{\"event\": \"start\"}', flush=True)\n"
                        "time.sleep(60)\n")
    job = jobs.CliJob(["detect"], command=[sys.executable, str(stubborn)]).start()
    deadline = time.monotonic() + 30
    while not job.poll() and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    job.cancel(grace_seconds=0.5, wait=True)
    assert time.monotonic() - started < 5
    assert job.state is jobs.JobState.CANCELLED
    assert job.returncode not in (0, None)


# A stand-in for PythonSlicer, which is a launcher: it starts the real interpreter (python-real) as its own child,
# passes its output through and waits for it. Here the "launcher" starts a "python-real" grandchild that ignores
# SIGTERM (a busy process that does not stop at once), reports the grandchild's pid, and waits.
LAUNCHER = """
import subprocess, sys
own_session = sys.argv[1] == "own-session"
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], start_new_session=own_session)
print('{"event": "start", "grandchild": %d}' % child.pid, flush=True)
sys.exit(child.wait())
"""
PYTHON_REAL = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


def _gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while jobs.process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not jobs.process_alive(pid)


def _start_launcher(tmp_path, mode):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    job = jobs.CliJob(["detect"], command=[sys.executable, str(launcher), mode, PYTHON_REAL]).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        started = [e for e in job.poll() if e["event"] == "start"]
        if started:
            return job, started[0]["grandchild"]
        time.sleep(0.02)
    raise AssertionError("the launcher stand-in did not start")


@pytest.mark.skipif(os.name == "nt", reason="the grandchild ignores SIGTERM, a POSIX signal")
@pytest.mark.parametrize("mode", ["same-group", "own-session"])
def test_cancel_kills_the_launcher_and_its_child_without_blocking(tmp_path, mode):
    job, grandchild = _start_launcher(tmp_path, mode)
    launcher = job.pid
    assert jobs.descendants(launcher) == [grandchild]
    started = time.monotonic()
    job.cancel(grace_seconds=1.0)
    # The GUI calls cancel() from a button: it must return at once, not after the grace time.
    assert time.monotonic() - started < 0.5
    assert job.wait(timeout=15) is jobs.JobState.CANCELLED
    assert _gone(launcher) and _gone(grandchild), f"python-real stand-in {grandchild} survived ({mode})"


def test_windows_tree_kill_uses_taskkill_without_psutil(monkeypatch):
    calls = []
    monkeypatch.setattr(jobs, "_psutil", lambda: None)
    monkeypatch.setattr(jobs.subprocess, "run", lambda argv, **options: calls.append(argv))
    jobs.kill_tree_windows(4321, [])
    assert calls == [["taskkill", "/PID", "4321", "/T", "/F"]]


def test_a_missing_program_fails_cleanly():
    job = jobs.CliJob(["detect"], command=["/nonexistent/PythonSlicer", "-m", "iltm"]).start()
    assert job.state is jobs.JobState.FAILED
    assert job.error_message.startswith("Cannot start /nonexistent/PythonSlicer")
    job.cancel()  # nothing to cancel: no error
