"""How busy a command keeps the GPU: run it while sampling the device's utilisation, print the share of its wall time.

    python -m iltm_bench.gpu_busy [--interval-ms 200] [--gpu 0] -- iltm detect --run RUN --input DIR --out OUT

``nvidia-smi``'s ``utilization.gpu`` is the percentage of the last sample period during which at least one kernel ran,
so its mean over the command's life is the share of time the GPU was busy (issue 23's goal for a cohort detection:
at least 80 %). The first and last seconds (start-up, model loading, the summary) count too: that is what a user
waits for. ``--sampler`` replaces the ``nvidia-smi`` command line (it must print one percentage per line), which the
tests use.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import threading
import time


def sampler_command(gpu: int, interval_ms: int) -> list[str]:
    return ["nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
            f"-lms={interval_ms}"]


def parse_percentages(lines: list[str]) -> list[float]:
    """The numbers among ``lines`` (one percentage each); lines that are not one (a header, a warning) are skipped."""
    values = []
    for line in lines:
        text = line.strip().rstrip("%").strip()
        try:
            values.append(float(text))
        except ValueError:
            continue
    return values


def busy_while(command: list[str], sampler: list[str]) -> dict:
    """Run ``command`` to its end while ``sampler`` prints utilisation lines; their summary and the command's status."""
    probe = subprocess.Popen(sampler, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(probe.stdout), daemon=True)
    reader.start()
    start = time.perf_counter()
    try:
        returncode = subprocess.call(command)
    finally:
        seconds = time.perf_counter() - start
        probe.terminate()
        try:
            probe.wait(timeout=10)
        except subprocess.TimeoutExpired:
            probe.kill()
        reader.join(timeout=10)
    values = parse_percentages(lines)
    return {"returncode": returncode, "seconds": seconds, "samples": len(values),
            "mean_percent": sum(values) / len(values) if values else float("nan"),
            "idle_samples": sum(1 for v in values if v == 0.0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval-ms", type=int, default=200, help="sampling period (default 200 ms)")
    p.add_argument("--gpu", type=int, default=0, help="device index for nvidia-smi (default 0)")
    p.add_argument("--sampler", help="command that prints one utilisation percentage per line instead of nvidia-smi")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    sampler = shlex.split(args.sampler) if args.sampler else sampler_command(args.gpu, args.interval_ms)
    result = busy_while(command, sampler)
    print(f"# {shlex.join(command)}")
    print(f"wall {result['seconds']:.1f} s, exit {result['returncode']}, {result['samples']} samples, GPU busy "
          f"{result['mean_percent']:.1f} % of the time (mean utilization.gpu), {result['idle_samples']} samples idle")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
