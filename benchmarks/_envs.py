"""Peers' virtual environments, created by the harness under ``.benchmarks/venvs/`` (git-ignored).

Each environment is ``python -m venv --system-site-packages``: the peer's dependencies (torch,
scanpy, numpy, ...) come from the main environment where they are installed there, so pip adds
only the peer and what it needs on top. An environment is rebuilt when its requirements change
(they are kept in ``<venv>/.installed``).

- ``celltypist``: CellTypist 1.7.1 passes ``multi_class`` to ``LogisticRegression``, which
  scikit-learn 1.8 removed, so the environment pins an older scikit-learn over the main one.
- ``scnym_original``: the original scNym (``scnym`` 0.3.2, calico/scnym, the newest on PyPI).
  It pins the 2020 stack (torch 1.4, numpy 1.18, scanpy 1.6, ...), none of which installs on
  Python 3.11, so it is installed with ``--no-deps`` on top of the main environment's torch,
  numpy, pandas, scipy, scikit-learn, scanpy, anndata, h5py, tqdm, tensorboard, PyYAML and
  requests, plus ``configargparse`` that it imports at module level. Its other pins (leidenalg,
  louvain, umap-learn, numpy-groupies, tensorboardX, ...) are not imported by ``scnym.api``
  training and prediction. torchvision, which ``scnym.dataprep`` imports only for
  ``transforms.Compose``, is replaced by a stub in the child (``_peers_scnym_original.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _common import ROOT

VENVS = ROOT / ".benchmarks" / "venvs"
#: Environment name -> ``pip install`` arguments.
ENVS: dict[str, tuple[str, ...]] = {
    "celltypist": ("celltypist==1.7.1", "scikit-learn>=1.5,<1.8"),
    "scnym_original": ("--no-deps", "scnym==0.3.2", "configargparse"),
}


def env_python(name: str, venvs: Path = VENVS) -> Path:
    """The python of environment ``name`` (see :data:`ENVS`), created when missing or stale.

    Raises
    ------
    RuntimeError
        ``venv`` or ``pip`` failed; the message has pip's error and what to do.
    """
    venv = venvs / name
    python = venv / "bin" / "python"
    ready = venv / ".installed"
    wanted = "\n".join(ENVS[name]) + "\n"
    if python.exists() and ready.exists() and ready.read_text() == wanted:
        return python
    venvs.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", "--system-site-packages", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", *ENVS[name]],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"Could not create the {name} environment ({' '.join(step)}):\n"
                f"{done.stderr[-3000:]}\nDelete {venv} and rerun, or check that the package "
                "index is reachable."
            )
    ready.write_text(wanted)
    return python
