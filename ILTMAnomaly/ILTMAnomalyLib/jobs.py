"""The ``iltm`` command line run as a child process, its JSON-lines progress read without blocking.

Long work never runs in Slicer's own process: a crash or a stuck GPU cannot take the application down, and the
user can cancel at any moment. :class:`CliJob` starts ``python -m iltm <command> ... --progress jsonl``; two
reader threads put every stdout/stderr line on a queue, and :meth:`CliJob.poll` (called from a GUI timer, or
by :meth:`CliJob.wait` without a GUI) drains it and turns lines into events.

Protocol (stdout, one JSON object per line, other lines tolerated)::

    {"event": "start", "command": ...}
    {"event": "progress", "stage": s, "done": i, "total": n, "fraction": f or null}
    {"event": "log", "message": m}
    {"event": "iteration", "iteration": k, "resampling_threshold": t, "masked_tokens": m, "masked_change": c}
    {"event": "output", "kind": "score" | "mask" | "overlay", "path": p}
    {"event": "done"}
    {"event": "error", "message": m}

A failed command exits with code 2 and prints one line ``iltm: error: <where>: <problem>`` on stderr.
"""

from __future__ import annotations

import enum
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

ERROR_PREFIX = "iltm: error:"
# The folder holding the ``iltm`` package: next to ILTMAnomalyLib in the source tree and in an installed extension.
CORE_PARENT = Path(__file__).resolve().parents[1]


class JobState(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def parse_line(line: str) -> dict:
    """One output line as an event dict; anything that is not a JSON object becomes ``{"event": "text"}``."""
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("event"), str):
            return value
    return {"event": "text", "message": text}


def python_executable() -> str:
    """The Python that runs the core: Slicer's ``PythonSlicer`` inside Slicer, else this interpreter."""
    import slicer

    if hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def iltm_command(python: Optional[str] = None) -> list[str]:
    return [python or python_executable(), "-m", "iltm"]


def child_environment(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment, with the bundled core importable and output unbuffered (live progress)."""
    env = dict(os.environ)
    paths = [os.fspath(CORE_PARENT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if extra:
        env.update(extra)
    return env


class CliJob:
    """One run of the ``iltm`` command line in a child process.

    Args:
        args: the command's arguments after ``iltm`` (``["detect", "--run", ...]``); ``--progress jsonl`` is
            added when absent.
        command: the program to run; default ``[python, "-m", "iltm"]`` (tests pass a fake CLI here).
        env: extra environment variables for the child.
        on_event: called with every event dict as :meth:`poll` reads it.

    Attributes after :meth:`poll`: ``state``, ``returncode``, ``fraction`` (0..1 or None), ``stage``,
    ``message`` (latest progress text), ``outputs`` (kind -> list of paths), ``iterations`` (iteration events),
    ``log`` (all lines, for the panel's log box) and ``error_message`` (one line, when failed).
    """

    def __init__(self, args: list[str], command: Optional[list[str]] = None, env: Optional[dict[str, str]] = None,
                 on_event: Optional[Callable[[dict], None]] = None, cwd: Optional[Union[str, os.PathLike]] = None):
        self.args = list(args)
        if "--progress" not in self.args:
            self.args += ["--progress", "jsonl"]
        self.command = list(command) if command else iltm_command()
        self.env = child_environment(env)
        self.cwd = cwd
        self.on_event = on_event

        self.state = JobState.NOT_STARTED
        self.returncode: Optional[int] = None
        self.fraction: Optional[float] = None
        self.stage: Optional[str] = None
        self.message = ""
        self.outputs: dict[str, list[str]] = {}
        self.iterations: list[dict] = []
        self.log: list[str] = []
        self.error_message: Optional[str] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None

        self._process: Optional[subprocess.Popen] = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._stderr_lines: list[str] = []
        self._error_event: Optional[str] = None
        self._cancel_requested = False
        self._exit_seen = False
        self._stopper: Optional[threading.Thread] = None

    @property
    def argv(self) -> list[str]:
        return self.command + self.args

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process else None

    @property
    def finished(self) -> bool:
        return self.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    def start(self) -> "CliJob":
        if self.state is not JobState.NOT_STARTED:
            raise RuntimeError("a job can only be started once")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            # Own process group: Cancel reaches data-loader workers the CLI may have started, too.
            kwargs["start_new_session"] = True
        try:
            self._process = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        except OSError as error:
            self.state = JobState.FAILED
            self.error_message = f"Cannot start {self.command[0]}: {error.strerror or error}"
            return self
        self.state = JobState.RUNNING
        self.started_at = time.monotonic()
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, name), daemon=True,
                                      name=f"iltm-{name}-{self._process.pid}")
            reader.start()
            self._readers.append(reader)
        threading.Thread(target=self._wait_for_exit, daemon=True, name=f"iltm-wait-{self._process.pid}").start()
        return self

    def _read(self, stream, name: str) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put((name, line))
        stream.close()

    def _wait_for_exit(self) -> None:
        returncode = self._process.wait()
        # A grandchild that inherited the pipes could keep them open for ever: do not wait on it long.
        for reader in self._readers:
            reader.join(timeout=10)
        self._queue.put(("exit", returncode))

    def poll(self) -> list[dict]:
        """Handle every line that arrived since the last call; never blocks. Returns the new events."""
        events = []
        while True:
            try:
                source, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if source == "exit":
                self._finish(payload)
                events.append({"event": "exit", "returncode": payload})
                continue
            event = self._handle_line(source, payload)
            if event is not None:
                events.append(event)
        if self.on_event:
            for event in events:
                self.on_event(event)
        return events

    def _handle_line(self, source: str, line: str) -> Optional[dict]:
        text = line.rstrip("\r\n")
        if not text.strip():
            return None
        if source == "stderr":
            self._stderr_lines.append(text)
            self.log.append(text)
            return {"event": "stderr", "message": text}
        event = parse_line(text)
        kind = event["event"]
        if kind == "progress":
            self.stage = event.get("stage") or self.stage
            fraction = event.get("fraction")
            if isinstance(fraction, (int, float)):
                self.fraction = min(1.0, max(0.0, float(fraction)))
            done, total = event.get("done"), event.get("total")
            self.message = f"{self.stage}: {done}/{total}" if total else f"{self.stage}: {done}"
        elif kind == "log":
            self.message = str(event.get("message", ""))
            self.log.append(self.message)
        elif kind == "iteration":
            self.iterations.append(event)
            self.log.append(format_iteration(event))
        elif kind == "output":
            self.outputs.setdefault(str(event.get("kind")), []).append(str(event.get("path")))
        elif kind == "error":
            self._error_event = str(event.get("message", "")).strip() or None
        elif kind == "done":
            self.fraction = 1.0
        elif kind == "text":
            self.log.append(text)
        return event

    def _finish(self, returncode: int) -> None:
        self._exit_seen = True
        self.returncode = returncode
        self.finished_at = time.monotonic()
        if self._cancel_requested:
            self.state = JobState.CANCELLED
            self.error_message = "Cancelled."
        elif returncode == 0:
            self.state = JobState.SUCCEEDED
        else:
            self.state = JobState.FAILED
            self.error_message = self._failure_line(returncode)

    def _failure_line(self, returncode: int) -> str:
        for line in reversed(self._stderr_lines):
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX):].strip()
        if self._error_event:
            return self._error_event
        last = next((line.strip() for line in reversed(self._stderr_lines) if line.strip()), None)
        if returncode < 0:
            return f"iltm was stopped by signal {-returncode}." + (f" Last message: {last}" if last else "")
        return f"iltm failed with exit code {returncode}." + (f" Last message: {last}" if last else "")

    def wait(self, timeout: Optional[float] = None, poll_interval: float = 0.05) -> JobState:
        """Block until the job ends (or ``timeout`` seconds pass), handling events as they come."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state is JobState.RUNNING:
            self.poll()
            if self.state is not JobState.RUNNING:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll_interval)
        return self.state

    def cancel(self, grace_seconds: float = 5.0, wait: bool = False) -> None:
        """Stop the whole process tree; returns at once (the GUI never waits) unless ``wait`` is True.

        ``PythonSlicer`` is a launcher that runs ``python-real`` as its own child, and the CLI may start workers:
        ending the launcher alone would leave the work running, holding the GPU and writing into the run folder.
        A background thread asks the tree to stop (SIGTERM to the process group on POSIX), kills whatever is left
        after ``grace_seconds`` (Windows has no polite request for a windowless process: the tree is killed at
        once), and the exit then reaches :meth:`poll`, which turns the state to CANCELLED.

        Args:
            grace_seconds: how long the tree may take to stop on its own before it is killed.
            wait: block until the job has ended (scripts, tests, the module's shutdown).
        """
        if self._process is None or self.finished:
            return
        if not self._cancel_requested:
            self._cancel_requested = True
            self._stopper = threading.Thread(target=stop_process_tree, args=(self._process, grace_seconds),
                                             daemon=True, name=f"iltm-cancel-{self._process.pid}")
            self._stopper.start()
        if wait:
            self._stopper.join()
            self.wait(timeout=max(1.0, grace_seconds) + 10.0)


# -- stopping a process tree ----------------------------------------------------------------------------------

def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def descendants(pid: int) -> List[int]:
    """Process ids of every descendant of ``pid`` (children first found, grandchildren after), best effort.

    psutil when it is installed; else on POSIX the parent links that ``ps`` lists; else (Windows without psutil)
    none, and ``taskkill /T`` walks the tree itself.
    """
    psutil = _psutil()
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    if os.name == "nt":
        return []
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: Dict[int, List[int]] = {}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(fields[0]))
    found, frontier = [], [pid]
    while frontier:
        next_frontier = [child for parent in frontier for child in children.get(parent, ()) if child not in found]
        found += next_frontier
        frontier = next_frontier
    return found


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    if os.name == "nt":
        # Without psutil: tasklist prints the process when it exists.
        try:
            listing = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True,
                                     timeout=10, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0)).stdout
        except (OSError, subprocess.SubprocessError):
            return False
        return str(pid) in listing.split()
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(pid: int, sig, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def kill_tree_windows(pid: int, tree: List[int]) -> None:
    """Kill ``pid`` and its descendants: psutil when installed, else ``taskkill /T /F`` (Windows' own tree kill)."""
    psutil = _psutil()
    if psutil is not None:
        for member in [pid] + tree:
            try:
                psutil.Process(member).kill()
            except psutil.Error:
                pass
        return
    try:
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, timeout=30, check=False,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    except (OSError, subprocess.SubprocessError):
        pass


def stop_process_tree(process: subprocess.Popen, grace_seconds: float = 5.0) -> None:
    """Stop ``process`` (started in its own session / process group by :class:`CliJob`) and all it started.

    Blocks for up to ``grace_seconds`` and a little more: :meth:`CliJob.cancel` runs it on a thread.
    """
    pid = process.pid
    # Taken while the launcher still runs: once it is gone its children no longer name it as their parent.
    tree = descendants(pid)
    if os.name == "nt":
        kill_tree_windows(pid, tree)
        try:
            process.kill()
        except OSError:
            pass
        return
    _send(pid, signal.SIGTERM, group=True)
    for member in tree:
        _send(member, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None and not any(process_alive(member) for member in tree):
            break
        time.sleep(0.02)
    # Whatever is left: the group (workers that kept it) and descendants that left it.
    _send(pid, signal.SIGKILL, group=True)
    for member in tree + [m for m in descendants(pid) if m not in tree]:
        _send(member, signal.SIGKILL)
    if process.poll() is None:
        _send(pid, signal.SIGKILL)


def format_iteration(event: dict) -> str:
    change = event.get("masked_change")
    change_text = "" if change is None else f", change {100.0 * float(change):.1f} %"
    threshold = event.get("resampling_threshold")
    threshold_text = "" if threshold is None else f", threshold {float(threshold):.4g}"
    return (f"Iteration {event.get('iteration')}: {event.get('masked_tokens')} masked tokens"
            f"{threshold_text}{change_text}")
