"""The gateway benchmark's instruments: wrk, our fixed-rate load generator, and /proc.

Kept apart from bench_gateway.py, which decides what to measure and what the
figures mean; these only measure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

LOADGEN_SOURCE = Path(__file__).resolve().parent / "loadgen"


class Latency(NamedTuple):
    """One fixed-rate run of the load generator."""

    p50: float  # ms
    p99: float  # ms
    served: float  # requests/s answered over the recorded span

    @property
    def tail(self) -> float:
        return self.p99 / self.p50


class CpuTimes(NamedTuple):
    """What a process's threads have had of the CPUs so far, in seconds."""

    ran: float  # on a CPU
    waited: float  # runnable, in a run queue, while something else had the CPU

    def __sub__(self, earlier: CpuTimes) -> CpuTimes:
        return CpuTimes(self.ran - earlier.ran, self.waited - earlier.waited)


def wrk(url: str, headers: dict[str, str], seconds: int, connections: int) -> float:
    """Requests per second, from one wrk run."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    # Despite its label, wrk counts only statuses above 399 here: a 3xx is
    # caught by the bench's check_answers() instead, before any run.
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{out}")
    # Printed only when there are some: connections refused, reset or timed
    # out are requests that did not count, so the rate would flatter the server.
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sockets and any(int(n) for n in sockets.groups()):
        raise RuntimeError(f"{url}: socket errors\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def loadgen() -> Path:
    """Our fixed-rate load generator (tests/bench/loadgen), built once into the cache."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(LOADGEN_SOURCE.glob("*.go*")))).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "todo-mesh" / f"loadgen-{digest}"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["go", "build", "-o", str(cache), "."], cwd=LOADGEN_SOURCE, check=True, timeout=300)
    return cache


def latency_at(url: str, headers: dict[str, str], rate: float, seconds: int) -> Latency:
    """p50 and p99 (ms) at a fixed rate, counted from when each request was due."""
    # The load generator's default warm-up (1 s) is sent too, not recorded.
    args = [str(loadgen()), "-url", url, "-rate", f"{rate:.0f}", "-duration", f"{seconds}s", "-warmup", "1s"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    result = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout)
    return Latency(result["p50_ms"], result["p99_ms"], result["achieved_rps"])


def cpu_times(pid: int) -> CpuTimes:
    """Run time and run-queue wait of all of a process's threads, from the scheduler's own counts.

    /proc/<pid>/task/<tid>/schedstat holds nanoseconds on a CPU, then
    nanoseconds runnable but waiting for one. The wait is what a latency
    figure cannot show by itself: time a request was ready to be worked on
    while the CPUs were busy with other processes. A thread that exits
    between two readings takes its share with it; the services' threads live
    as long as they do.
    """
    ran = waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu, in_queue, _ = (task / "schedstat").read_text().split()
        except FileNotFoundError:  # the thread has just exited
            continue
        ran += int(on_cpu)
        waited += int(in_queue)
    return CpuTimes(ran / 1e9, waited / 1e9)
