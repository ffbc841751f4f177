"""Nearest neighbours from 10,000 to 200,000 points: exact, inverted file and pynndescent.

``lt.base._neighbors.knn`` is exact up to ``EXACT_MAX_CELLS`` points; above, it uses the
inverted-file index (``_neighbors._inverted_file``: mini-batch k-means lists, 8 probed lists)
up to ``IVF_MAX_CELLS`` and NN-descent from pynndescent (``_neighbors._nndescent``,
umap-learn's parameters) beyond. This script measures them side by side on
Gaussian-mixture data:

- 10,000, 20,000, 50,000, 100,000 and 200,000 points in 32 and 64 dimensions; 30 components
  with long-tailed weights (Dirichlet 0.5), centres ``3 * N(0, I)``, each with a random
  rotation of a decaying spectrum (variance ``1 / i`` along axis ``i``, as PCs or a latent
  space), plus one harder case with isotropic components (200,000 x 64);
- recall@10: the mean share of the 10 exact neighbours (scikit-learn, the package's exact
  path) found, over 2,000 random points, each point itself excluded;
- wall and CPU seconds of one call computing the neighbours of every point, one thread
  (``OMP_NUM_THREADS=1``, ``NUMBA_NUM_THREADS=1``, ``torch.set_num_threads(1)``): the exact
  search up to 50,000 points (where ``EXACT_MAX_CELLS`` is chosen), the two approximate ones
  at every size. They run in this process, interleaved (the first one rotates per data set),
  after a warm-up on 5,000 points whose time (numba compilation, torch start-up: paid once
  per process) is reported apart.

Run from the repository root: ``python benchmarks/neighbors.py`` (about 8 minutes on a
quiet core; ``--quick``: the cases up to 50,000 points). Writes ``results/neighbors.md``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = "1"  # before numpy, torch and numba start their thread pools

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, machine_info, uptime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "results" / "neighbors.md"
K = 10
N_SAMPLE = 2_000
N_COMPONENTS = 30
#: Largest data set on which the exact search is timed (its cost grows as ``n**2``).
EXACT_TIMED_MAX = 50_000
#: (points, dimensions, covariance) of each data set.
CASES = [
    (10_000, 32, "decaying"),
    (10_000, 64, "decaying"),
    (20_000, 32, "decaying"),
    (20_000, 64, "decaying"),
    (50_000, 32, "decaying"),
    (50_000, 64, "decaying"),
    (100_000, 32, "decaying"),
    (100_000, 64, "decaying"),
    (200_000, 32, "decaying"),
    (200_000, 64, "decaying"),
    (200_000, 64, "isotropic"),
]


def mixture(n: int, dim: int, covariance: str, seed: int = 0) -> np.ndarray:
    """``n`` points of a ``N_COMPONENTS``-component Gaussian mixture in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(N_COMPONENTS, 0.5))
    labels = rng.choice(N_COMPONENTS, size=n, p=weights)
    centres = 3.0 * rng.normal(size=(N_COMPONENTS, dim))
    scales = 1.0 / np.sqrt(np.arange(1, dim + 1)) if covariance == "decaying" else np.ones(dim)
    x = np.empty((n, dim), dtype=np.float32)
    for c in range(N_COMPONENTS):
        members = labels == c
        rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        noise = rng.normal(size=(int(members.sum()), dim)) * scales
        x[members] = centres[c] + noise @ rotation.T
    return x


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact neighbours among the found ones."""
    hits = [len(set(f) & set(e)) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / exact.shape[1]


def timed(fn, *args, **kwargs) -> tuple[np.ndarray, float, float]:
    """Result, wall seconds and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def commit() -> str:
    """Short hash of HEAD, flagged when the measured files differ from it."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    paths = ["src/labeltransfer/base/_neighbors.py", "benchmarks/neighbors.py"]
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=ROOT).returncode
    return head + (" (with uncommitted changes to the measured files)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the cases up to 50,000 points only")
    args = parser.parse_args()

    import torch

    from labeltransfer.base import _neighbors

    torch.set_num_threads(1)
    cases = [c for c in CASES if c[0] <= EXACT_TIMED_MAX] if args.quick else CASES
    methods = {
        "exact": lambda x, rows: _neighbors._exact(x, K, rows),
        "inverted file": lambda x, rows: _neighbors._inverted_file(x, K + 1, rows, seed=0),
        "pynndescent": lambda x, rows: _neighbors._nndescent(x, K + 1, rows, seed=0),
    }
    header = [
        "# Nearest neighbours: exact, inverted file and pynndescent",
        "",
        "Generated by `benchmarks/neighbors.py` (see its docstring for the data and the "
        "protocol). Recall@10 over 2,000 random points against exact neighbours; seconds of "
        "one call finding the 10 nearest neighbours of every point, one thread. `knn` searches "
        f"exactly up to {_neighbors.EXACT_MAX_CELLS:,} points, with the inverted file up to "
        f"{_neighbors.IVF_MAX_CELLS:,}, with pynndescent above.",
        "",
        f"- machine: {describe_machine(machine_info())}",
        f"- commit: {commit()}",
        f"- uptime at start: `{uptime()}`",
    ]
    table = [
        "",
        "| points | dims | covariance | method | recall@10 | wall s | CPU s |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    warm = mixture(5_000, 32, "decaying", seed=1)
    first = {}  # numba compilation and torch start-up: once per process, outside the table
    for name, run in methods.items():
        first[name] = timed(run, warm, np.arange(len(warm)))[1]
    header.append(
        "- first call in this fresh process (5,000 points; numba compilation, torch start-up): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in first.items())
        + f"; `knn` pays pynndescent's once per process above {_neighbors.IVF_MAX_CELLS:,} points"
    )

    for i, (n, dim, covariance) in enumerate(cases):
        x = mixture(n, dim, covariance)
        every = np.arange(n)
        sample = np.random.default_rng(1).choice(n, N_SAMPLE, replace=False)
        exact = _neighbors._drop_self(_neighbors._exact(x, K, sample), sample, K)
        names = [m for m in methods if m != "exact" or n <= EXACT_TIMED_MAX]
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            found, wall, cpu = timed(methods[name], x, every)
            found = _neighbors._drop_self(found[sample], sample, K)
            rec = recall(found, exact)
            table.append(
                f"| {n:,} | {dim} | {covariance} | {name} | {rec:.4f} | {wall:.1f} | {cpu:.1f} |"
            )
            print(table[-1], flush=True)
            # written after every run: a late failure keeps what was measured
            OUT.write_text("\n".join([*header, "- uptime at end: (running)", *table, ""]))
    OUT.write_text("\n".join([*header, f"- uptime at end: `{uptime()}`", *table, ""]))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
