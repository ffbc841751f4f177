"""Helpers shared by the benchmark scripts: peak memory, timing, machine description, children.

Each benchmark configuration should run in a fresh Python process (:func:`run_child`) so that
the peak resident memory it reports (``VmHWM`` of ``/proc/self/status``, read at the end of the
child with :func:`peak_rss_mb`) belongs to that configuration alone. The child prints one
``RESULT {json}`` line per record; :func:`emit` writes it and :func:`run_child` parses it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

RESULT_PREFIX = "RESULT "
#: Defaults of every child's environment (the caller's environment wins). scanpy's numba
#: kernels (normalize_total, neighbours, UMAP) start one spinning worker thread per core that
#: ``OMP_NUM_THREADS`` does not limit; next to them torch ran ~40x slower on 2 cores.
CHILD_ENV = {"NUMBA_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- memory
def rss_mb(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB (``VmRSS`` now, ``VmHWM`` the peak)."""
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+)\s+kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``VmHWM``) in MiB."""
    return rss_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------- timing
class Stopwatch:
    """Named laps: ``with sw("train"): ...`` then ``sw.seconds["train"]`` (wall clock).

    ``sw.cpu_seconds`` holds the CPU time of this process (all threads, user + system) over
    the same laps; ``cpu_seconds / seconds`` near the number of compute threads means the lap
    had the cores to itself, much lower means it waited for a CPU (a busy shared machine).
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu


def epoch_timer():
    """A Lightning callback recording the wall time of each training epoch (``.epochs``).

    An epoch runs from ``on_train_epoch_start`` to ``on_train_epoch_end``, so it includes the
    validation loop that Lightning runs at the end of the epoch. Lightning is imported lazily.
    """
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[float] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epochs.append(time.perf_counter() - self._start)

        @property
        def mean(self) -> float:
            return sum(self.epochs) / len(self.epochs) if self.epochs else float("nan")

    return EpochTimer()


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or "unknown CPU"
    return match.group(1).strip() if match else (platform.processor() or "unknown CPU")


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages."""
    return os.getloadavg()


def uptime() -> str:
    """The output of ``uptime`` (load averages), or a fallback built from ``os.getloadavg``."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in load_average())


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions and the date (UTC)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for package in ("torch", "scvi", "lightning", "numpy", "scipy", "anndata", "labeltransfer"):
        try:
            from importlib.metadata import version

            info[package] = version("scvi-tools" if package == "scvi" else package)
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            info[package] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    return info


def describe_machine(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']:.0f} GiB RAM, "
        f"{'GPU' if info.get('cuda') else 'no GPU'}; Python {info['python']}, "
        f"torch {info.get('torch')} (default {info.get('torch_threads')} threads), "
        f"scvi-tools {info.get('scvi')}, lightning {info.get('lightning')}; {info['date']}"
    )


def source_fingerprint(root: Path | str) -> dict[str, str]:
    """SHA-1 over the ``*.py`` files under ``root`` (path and content) and the newest mtime.

    Record it at the start and the end of a benchmark: the package is installed editable and
    shared, so a change of the source during a run would mix two versions of the code.
    """
    import hashlib

    digest = hashlib.sha1(usedforsecurity=False)
    newest = 0.0
    for path in sorted(Path(root).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        newest = max(newest, path.stat().st_mtime)
    stamp = datetime.fromtimestamp(newest, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"sha1": digest.hexdigest()[:12], "newest_mtime": stamp}


# ----------------------------------------------------------------------------- children
def emit(record: dict[str, Any]) -> None:
    """Print one result record for the parent (NaN becomes null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
    print(RESULT_PREFIX + json.dumps(clean), flush=True)


def run_child(
    args: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    python: str | os.PathLike[str] | None = None,
) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run ``python <args>`` in a fresh process.

    ``python`` is the interpreter to use (default: this one, ``sys.executable``), e.g. the
    ``bin/python`` of another virtual environment holding a third-party implementation.
    Returns the parsed ``RESULT`` records, the error text (stderr tail with the traceback)
    when the child failed or printed no record, and the wall time in seconds.
    """
    start = time.perf_counter()
    try:
        out = subprocess.run(
            [str(python) if python is not None else sys.executable, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**CHILD_ENV, **os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-4000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return [], f"timed out after {timeout} s\n{tail}", time.perf_counter() - start
    wall = time.perf_counter() - start
    records = [
        json.loads(line.removeprefix(RESULT_PREFIX))
        for line in out.stdout.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]
    error = None
    if out.returncode != 0 or not records:
        error = f"exit status {out.returncode}\n" + (out.stderr or out.stdout)[-6000:]
    return records, error, wall


# ----------------------------------------------------------------------------- formatting
def mean_sd(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` (sample sd) of the finite values, ``mean`` alone for one, ``n/a`` for none."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return "n/a"
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return f"{mean:.{digits}f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def seed_table(frame, columns: Sequence[str], by: Sequence[str]) -> str:
    """Markdown table of mean ± sd over seeds of ``columns``, one row per ``by`` group."""
    lines = [
        "| " + " | ".join([*by, "seeds", *columns]) + " |",
        "|" + "---|" * (len(by) + 1 + len(columns)),
    ]
    for keys, group in frame.groupby(list(by), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        cells = [mean_sd(group[c].tolist()) if c in group else "n/a" for c in columns]
        lines.append("| " + " | ".join([*map(str, keys), str(len(group)), *cells]) + " |")
    return "\n".join(lines)


def run_suite(
    script: str,
    configs: Sequence[dict[str, Any]],
    *,
    source: Path,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    hidden: str | None = None,
):
    """Run ``script --child <config>`` for each config in a fresh process, interleaved logging.

    Returns a DataFrame of every record, stamped with the machine, the uptime at the start and
    the end, the SHA-1 of ``source`` at the start and the end and the total seconds, and the
    number of failed configurations. Each record is printed as it arrives (fields whose name
    contains ``hidden``, if given, are left out of the log line, not of the frame).
    """
    import pandas as pd

    start, source_start, t0 = uptime(), source_fingerprint(source), time.perf_counter()
    rows, failed = [], 0
    for i, config in enumerate(configs, 1):
        records, error, wall = run_child(
            [script, "--child", json.dumps(config)], timeout=timeout, env=env
        )
        tag = f"[{i}/{len(configs)}] {config['experiment']} {config['variant']} seed {config['seed']}"
        if error:
            failed += 1
            print(f"{tag}: FAILED after {wall:.0f} s\n{error}", flush=True)
            continue
        rows += records
        shown = {
            k: v for k, v in records[0].items() if k not in config and not (hidden and hidden in k)
        }
        print(f"{tag} ({wall:.0f} s): {json.dumps(shown)}", flush=True)
    frame = pd.DataFrame(rows)
    frame["machine"] = describe_machine(machine_info())
    frame["uptime_start"], frame["uptime_end"] = start, uptime()
    frame["source_start"] = source_start["sha1"]
    frame["source_end"] = source_fingerprint(source)["sha1"]
    frame["total_s"] = time.perf_counter() - t0
    return frame, failed
