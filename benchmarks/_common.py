"""Measurement helpers of the benchmark harness: memory, timing, machine, source, children.

Every benchmark run executes in a fresh Python process (:func:`run_child`) so that the peak
resident memory it reports (``VmHWM`` of ``/proc/self/status``, :func:`peak_rss_mb`) belongs to
that run alone. The child prints one ``RESULT {json}`` line per record (:func:`emit`);
:func:`run_child` parses them.
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

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "labeltransfer"
RESULT_PREFIX = "RESULT "
#: Defaults of every child's environment (the caller's environment wins): one BLAS / OpenMP
#: thread. scanpy's numba kernels (normalize_total, neighbours, UMAP) start one spinning worker
#: thread per core that ``OMP_NUM_THREADS`` does not limit; next to them torch ran ~10-40x
#: slower on the 2-core development machine, hence ``NUMBA_NUM_THREADS`` too.
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}


# ----------------------------------------------------------------------------- memory
def rss_mb(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB (``VmRSS`` now, ``VmHWM`` the peak)."""
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+)\s+kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (``VmHWM``) in MiB."""
    return rss_mb("VmHWM")


def csr_mib(matrix: Any) -> float:
    """Memory of a CSR matrix's three arrays (values, column indices, row pointers) in MiB."""
    return (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**20


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

    def record(self) -> dict[str, float]:
        """``{lap}_s`` and ``{lap}_cpu_s`` of every lap."""
        return {
            **{f"{name}_s": value for name, value in self.seconds.items()},
            **{f"{name}_cpu_s": value for name, value in self.cpu_seconds.items()},
        }


def training_meter():
    """A Lightning callback measuring a training run: epochs, steps and cells.

    ``.epochs`` holds the wall time of each training epoch (``on_train_epoch_start`` to
    ``on_train_epoch_end``, so it includes the validation loop Lightning runs at the end of the
    epoch), ``.validation_s`` the total wall time of the validation loops, ``.steps`` the
    training batches run and ``.cells`` the cells in them (every ``"X"`` tensor of a batch: a
    reference + query pair counts both). ``summary(prefix)`` gives them as record fields.
    """
    import lightning.pytorch as pl

    class TrainingMeter(pl.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[float] = []
            self.validation_s = 0.0
            self.steps = 0
            self.cells = 0
            self._start = self._val_start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.epochs.append(time.perf_counter() - self._start)

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self._val_start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            self.validation_s += time.perf_counter() - self._val_start

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            parts = batch if isinstance(batch, tuple | list) else [batch]
            self.steps += 1
            self.cells += sum(
                int(part["X"].shape[0]) for part in parts if isinstance(part, dict) and "X" in part
            )

        def summary(self, prefix: str) -> dict[str, float]:
            n = len(self.epochs)
            return {
                f"{prefix}_epochs": n,
                f"{prefix}_s_per_epoch": sum(self.epochs) / n if n else math.nan,
                f"{prefix}_steps_per_epoch": self.steps / n if n else math.nan,
                f"{prefix}_cells_per_epoch": self.cells / n if n else math.nan,
            }

    return TrainingMeter()


# ----------------------------------------------------------------------------- machine, source
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or "unknown CPU"
    return match.group(1).strip() if match else (platform.processor() or "unknown CPU")


def uptime() -> str:
    """The output of ``uptime`` (load averages), or a fallback built from ``os.getloadavg``."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, library versions and the date (UTC)."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for package in ("torch", "scvi-tools", "lightning", "numpy", "scipy", "anndata", "scanpy"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: CPU, cores, RAM, GPU and the main library versions."""
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']:.0f} GiB RAM, "
        f"{info.get('gpu') or 'no GPU'}; Python {info['python']}, torch {info.get('torch')}, "
        f"scvi-tools {info.get('scvi-tools')}, lightning {info.get('lightning')}, "
        f"anndata {info.get('anndata')}, scanpy {info.get('scanpy')}; {info['date']}"
    )


def source_fingerprint(root: Path = SOURCE) -> str:
    """SHA-1 (12 digits) over the ``*.py`` files under ``root``, path and content.

    Recorded at the start and the end of a run: the package is installed editable, so a
    change of the source during a run would mix two versions of the code.
    """
    import hashlib

    digest = hashlib.sha1(usedforsecurity=False)
    for path in sorted(Path(root).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def source_commit() -> str:
    """``git rev-parse HEAD`` of the checkout, with ``+dirty`` when ``src/`` has changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


# ----------------------------------------------------------------------------- children
def quiet_child() -> None:
    """Silence the warnings and the info logs of a benchmark child (its stdout carries results)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "labeltransfer", "scvi", "celltypist"):
        logging.getLogger(name).setLevel(logging.ERROR)


def emit(record: dict[str, Any]) -> None:
    """Print one result record for the parent (NaN becomes null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
    print(RESULT_PREFIX + json.dumps(clean, default=str), flush=True)


def run_child(
    args: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    python: str | os.PathLike[str] | None = None,
) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run ``python <args>`` in a fresh process.

    ``python`` is the interpreter to use (default: this one, ``sys.executable``), e.g. the
    ``bin/python`` of a peer's virtual environment. Returns the parsed ``RESULT`` records, the
    error text (stderr tail with the traceback) when the child failed or printed no record, and
    the wall time in seconds.
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
