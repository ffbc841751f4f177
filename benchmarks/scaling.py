"""Scaling of the four models on CPU: train time per epoch, annotation throughput, peak memory.

For each size (10,000, 100,000 and 1,000,000 cells x 2,000 genes by default) the parent writes
one synthetic data set (``lt.data.synthetic``: raw counts, CSR float32, 10 seen types plus one
novel type in the query, library size 500, about 300 non-zero genes per cell; half the cells
are the labelled reference, half the unlabelled query) to an h5ad file in a temporary folder.
Each model then runs in a fresh process (``_common.run_child``, one torch thread) that

1. reads the file and sets the model up on all cells (``setup_anndata`` with the query cells
   unlabelled + the model's constructor; SCDET is told ``n_novel=1``, which skips its
   50-epoch warm-up);
2. resets the peak resident memory (``/proc/self/clear_refs``) and trains for one epoch
   (``max_epochs=1``; with ``--max-batches B`` for a size, only ``B`` training batches of the
   epoch run and the epoch time is scaled by ``batches per epoch / B``);
3. resets the peak again and annotates all cells (``model.annotate()``, in-memory data).

Every ``nn.Linear`` call is counted by a forward hook, ``2 * in * out`` floating-point
operations per row: the forward-pass arithmetic per cell of ``module.inference`` (one
minibatch), and the forward arithmetic of the training epoch (calls under autograd); training
arithmetic is taken as 3x its forward (backward ~2x). Dividing by the measured times gives the
achieved FLOP/s, compared with a ``torch.mm`` of the first layer's shape in the same process.

Usage::

    python benchmarks/scaling.py                     # 10k, 100k, 1M -> results/scaling.*
    python benchmarks/scaling.py --sizes 10000 100000 --models JIND
    python benchmarks/scaling.py --max-batches 1000000=400
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Stopwatch,
    describe_machine,
    emit,
    epoch_timer,
    machine_info,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    run_child,
    source_fingerprint,
    uptime,
)

RESULTS = ROOT / "benchmarks" / "results"
GENES, TYPES, LIBRARY = 2000, 10, 500.0
MODELS = ("JIND", "SCNYM", "SCDET", "CellPredX")
SIZES = (10_000, 100_000, 1_000_000)


# ----------------------------------------------------------------------------- data
def _write_data(path: Path, n_cells: int) -> dict[str, Any]:
    """Write the ``n_cells`` reference + query AnnData (runs in a child: memory is freed)."""
    import labeltransfer as lt

    start = time.perf_counter()
    ref, query = lt.data.synthetic(
        n_reference=n_cells // 2,
        n_query=n_cells - n_cells // 2,
        n_genes=GENES,
        n_types=TYPES,
        n_novel=1,
        batch_shift=0.3,
        library_size=LIBRARY,
        seed=0,
    )
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    del ref, query
    adata.write_h5ad(path)
    return {
        "n_cells": int(adata.n_obs),
        "nnz_per_cell": float(adata.X.nnz / adata.n_obs),
        "generate_s": time.perf_counter() - start,
        "file_gib": path.stat().st_size / 2**30,
    }


# ----------------------------------------------------------------------------- FLOPs
class LinearFlops:
    """Count ``2 * rows * in * out`` for every ``nn.Linear`` call of a module (forward hooks)."""

    def __init__(self, module) -> None:
        import torch

        self.grad = 0  # calls under autograd (training forward)
        self.no_grad = 0
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in module.modules()
            if isinstance(m, torch.nn.Linear)
        ]

    def _hook(self, layer, inputs, output) -> None:
        import torch

        x = inputs[0]
        flops = 2 * (x.numel() // x.shape[-1]) * layer.in_features * layer.out_features
        if torch.is_grad_enabled():
            self.grad += flops
        else:
            self.no_grad += flops

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _inference_flops_per_cell(model) -> float:
    """Forward arithmetic of ``module.inference`` per cell, on one minibatch of 256 cells."""
    import torch

    model.module.eval()
    loader = model._make_data_loader(adata=model.adata, indices=range(256), batch_size=256)
    tensors = next(iter(loader))
    counter = LinearFlops(model.module)
    with torch.inference_mode():
        model.module.inference(**model.module._get_inference_input(tensors))
    counter.remove()
    return counter.no_grad / 256


def _matmul_gflops(rows: int, n_in: int, n_out: int, repeats: int = 20) -> tuple[float, float]:
    """GFLOP per wall second and per CPU second of ``torch.mm`` at a first layer's shape."""
    import torch

    a, b = torch.randn(rows, n_in), torch.randn(n_in, n_out)
    torch.mm(a, b)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        torch.mm(a, b)
    flops = 2 * rows * n_in * n_out * repeats / 1e9
    return flops / (time.perf_counter() - start), flops / (time.process_time() - cpu)


# ----------------------------------------------------------------------------- child
def _validation_timer():
    """A Lightning callback summing the wall time of the validation loops (``.seconds``)."""
    import lightning.pytorch as pl

    class ValidationTimer(pl.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds = 0.0
            self._start = 0.0

        def on_validation_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            self.seconds += time.perf_counter() - self._start

    return ValidationTimer()


def _build(name: str, adata):
    import labeltransfer as lt

    cls = getattr(lt, name)
    cls.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
    if name == "SCDET":
        return cls(adata, n_novel=1)
    return cls(adata)


def _train_kwargs(name: str) -> dict[str, Any]:
    if name in ("SCNYM", "SCDET"):
        return {"early_stopping": False}
    return {}


def _child(config: dict[str, Any]) -> None:
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("labeltransfer").setLevel(logging.ERROR)
    import anndata as ad
    import scvi
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    scvi.settings.seed = 0
    sw = Stopwatch()
    record: dict[str, Any] = {k: v for k, v in config.items() if k != "path"}
    with sw("read"):
        adata = ad.read_h5ad(config["path"])
    with sw("setup"):
        model = _build(config["model"], adata)
    record["rss_after_setup_mb"] = rss_mb()
    record["peak_rss_setup_mb"] = peak_rss_mb()
    record["peak_reset"] = reset_peak_rss()
    timer, validation = epoch_timer(), _validation_timer()
    counter = LinearFlops(model.module)
    limit = config.get("max_batches")
    extra = {"limit_train_batches": int(limit)} if limit else {}
    with sw("train"):
        model.train(
            max_epochs=1,
            accelerator="cpu",
            enable_progress_bar=False,
            callbacks=[timer, validation],
            **_train_kwargs(config["model"]),
            **extra,
        )
    counter.remove()
    record["peak_rss_train_mb"] = peak_rss_mb()
    trainer = model.trainer
    batches_run = int(trainer.num_training_batches)
    batches_epoch = int(len(trainer.datamodule.train_dataloader()))
    batch_size = int(model.training_summary_.get("batch_size") or 0)
    epoch_measured = timer.epochs[0]
    val_s = min(validation.seconds, epoch_measured)
    scale = batches_epoch / batches_run if batches_run else float("nan")
    record.update(
        batches_run=batches_run,
        batches_per_epoch=batches_epoch,
        batch_size=batch_size,
        train_s=sw.seconds["train"],
        train_cpu_s=sw.cpu_seconds["train"],
        epoch_measured_s=epoch_measured,
        validation_s=val_s,
        epoch_s=(epoch_measured - val_s) * scale + val_s,
        train_steps_per_s=batches_run / (epoch_measured - val_s),
        train_cpu_per_wall=sw.cpu_seconds["train"] / sw.seconds["train"],
        train_forward_flops=counter.grad,
        train_forward_flops_per_step=counter.grad / batches_run if batches_run else float("nan"),
    )
    record["infer_flops_per_cell"] = _inference_flops_per_cell(model)
    record["rss_before_annotate_mb"] = rss_mb()  # includes memory training freed but kept
    record["peak_reset_annotate"] = reset_peak_rss()
    with sw("annotate"):
        model.annotate()
    record["peak_rss_annotate_mb"] = peak_rss_mb()
    n_input = model.module.n_input if hasattr(model.module, "n_input") else GENES
    first = next(m for m in model.module.modules() if isinstance(m, torch.nn.Linear))
    mm_wall, mm_cpu = _matmul_gflops(1024, first.in_features, first.out_features)
    record.update(
        n_cells=int(adata.n_obs),
        read_s=sw.seconds["read"],
        setup_s=sw.seconds["setup"],
        annotate_s=sw.seconds["annotate"],
        annotate_cpu_s=sw.cpu_seconds["annotate"],
        annotate_cpu_per_wall=sw.cpu_seconds["annotate"] / sw.seconds["annotate"],
        annotate_cells_per_s=adata.n_obs / sw.seconds["annotate"],
        n_input=int(n_input),
        matmul_gflops=mm_wall,
        matmul_gflops_cpu=mm_cpu,
        load_1min=__import__("os").getloadavg()[0],
    )
    emit(record)


# ----------------------------------------------------------------------------- table
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _model_order(column):
    """Sort key: sizes ascending, models in the order of :data:`MODELS`."""
    return column.map(MODELS.index) if column.name == "model" else column


def _markdown(frame, failures: list[str]) -> str:
    frame = frame.copy()
    runs = frame.groupby(["uptime_start", "uptime_end", "source_start", "source_end"], sort=False)
    stamps = [
        f"- sizes {', '.join(f'{n:,}' for n in sorted(group['size'].unique()))}: uptime at "
        f"start `{start}`, at end `{end}`; source SHA-1 at start / end {a} / {b}"
        for (start, end, a, b), group in runs
    ]
    frame["epoch_cpu_s"] = frame["epoch_s"] * frame["train_cpu_per_wall"]
    frame["annotate_cells_per_cpu_s"] = frame["n_cells"] / frame["annotate_cpu_s"]
    frame["train_gflops"] = (
        3 * frame["train_forward_flops_per_step"] * frame["train_steps_per_s"].astype(float) / 1e9
    )
    frame["infer_gflops"] = frame["infer_flops_per_cell"] * frame["annotate_cells_per_s"] / 1e9
    frame["infer_gflops_cpu"] = (
        frame["infer_flops_per_cell"] * frame["annotate_cells_per_cpu_s"] / 1e9
    )
    lines = [
        "# Scaling on CPU",
        "",
        f"Machine: {describe_machine(machine_info())}. One torch thread per run; every run is a "
        "fresh process.",
        "Written by `benchmarks/scaling.py`. Runs:",
        "",
        *stamps,
        "",
        "Data: `lt.data.synthetic` raw counts (CSR float32), 2,000 genes, 10 seen types + 1 novel "
        "type in the query, library size 500 (about 300 non-zero genes per cell), half "
        "labelled reference, half unlabelled query; the model is set up on all cells and "
        "annotates all of them.",
        "",
        "| model | cells | batches run / per epoch | epoch s | epoch CPU s (est.) "
        "| train steps/s | train s (all) | peak RSS train MB | annotate s | annotate cells/s "
        "| annotate cells per CPU s | peak RSS annotate MB | setup s "
        "| CPU/wall train, annotate | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        scaled = "" if r["batches_run"] == r["batches_per_epoch"] else " (scaled)"
        lines.append(
            f"| {r['model']} | {int(r['n_cells']):,} | {int(r['batches_run']):,} / "
            f"{int(r['batches_per_epoch']):,} | {_fmt(r['epoch_s'])}{scaled} "
            f"| {_fmt(r['epoch_cpu_s'])} "
            f"| {_fmt(r['train_steps_per_s'])} | {_fmt(r['train_s'])} "
            f"| {_fmt(r['peak_rss_train_mb'], 0)} "
            f"| {_fmt(r['annotate_s'])} | {_fmt(r['annotate_cells_per_s'], 0)} "
            f"| {_fmt(r['annotate_cells_per_cpu_s'], 0)} "
            f"| {_fmt(r['peak_rss_annotate_mb'], 0)} | {_fmt(r['setup_s'])} "
            f"| {r['train_cpu_per_wall']:.2f}, {r['annotate_cpu_per_wall']:.2f} "
            f"| {_fmt(r['load_1min'], 2)} |"
        )
    lines += [
        "",
        "## Arithmetic per cell and achieved FLOP/s",
        "",
        "Dense-layer arithmetic counted by forward hooks on every `nn.Linear` (`2 x in x out` "
        "per row). Inference: `module.inference` per cell. Training: forward FLOPs per "
        "training step (reference + query minibatches, every view and branch the loss uses) "
        "x 3 for forward + backward. `torch.mm` GFLOP/s is a 1024-row matmul of the first "
        "layer's shape in the same process: what one core reaches on this layer.",
        "",
        "| model | cells | inference MFLOP/cell | annotate GFLOP/s (per CPU s) "
        "| train MFLOP/step (fwd) | batch size | train GFLOP/s, 3x fwd (per CPU s) "
        "| torch.mm GFLOP/s (per CPU s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in frame.iterrows():
        lines.append(
            f"| {r['model']} | {int(r['n_cells']):,} | {r['infer_flops_per_cell'] / 1e6:.2f} "
            f"| {_fmt(r['infer_gflops'], 2)} ({_fmt(r['infer_gflops_cpu'], 2)}) "
            f"| {r['train_forward_flops_per_step'] / 1e6:,.0f} "
            f"| {int(r['batch_size'])} | {_fmt(r['train_gflops'], 2)} "
            f"({_fmt(r['train_gflops'] / r['train_cpu_per_wall'], 2)}) "
            f"| {_fmt(r['matmul_gflops'], 1)} ({_fmt(r.get('matmul_gflops_cpu'), 1)}) |"
        )
    lines += [
        "",
        "Peak RSS is `VmHWM` of the run's process, reset (`/proc/self/clear_refs`) after the "
        "setup and again after training, so the train column covers training (data, model, "
        "optimiser, validation, rejection fitting) and the annotate column covers "
        "`annotate()` (data and model already in memory). Epoch time comes from a Lightning "
        "callback and includes the epoch's validation pass; `(scaled)` marks sizes where only "
        "the first batches of the epoch ran: the training part of the epoch was multiplied by "
        "batches per epoch / batches run and the (complete) validation pass added. `train s "
        "(all)` is the whole `model.train()` call as run (capped or not). CPU/wall is the "
        "process CPU time over wall time: 1.0 means the run had its core to itself, less "
        "means it waited for a CPU on the shared machine (timings are then inflated by about "
        "its inverse). `epoch CPU s (est.)` = epoch s x train CPU/wall and `annotate cells per CPU "
        "s` = cells / annotation CPU seconds estimate what one idle core would take: use them "
        "to compare sizes and models run under different loads. The train CPU/wall ratio is "
        "that of the whole `train()` call, not of the epoch alone: where the load changed "
        "within the call the per-CPU-second training figures are off (SCDET at 1,000,000 "
        "cells: 127 GFLOP per CPU second, above what `torch.mm` reaches, so its epoch had "
        "more CPU than the call's average). SCDET's distribution estimation before the first epoch (inference on "
        "all training cells + k-means) is in its train time (`train_s` in the CSV), not in "
        "the epoch; CellPredX's PCA + kNN graph of the query is in its train time too.",
    ]
    if failures:
        lines += ["", "## Failed runs", "", *[f"```\n{f}\n```" for f in failures]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--max-batches",
        nargs="*",
        default=[],
        help="SIZE=BATCHES: train only this many batches of the epoch at that size",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--write-data", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.csv")
    parser.add_argument(
        "--markdown-only",
        nargs="*",
        metavar="CSV",
        help="rewrite results/scaling.md (and .csv) from these CSVs (default: --out)",
    )
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    if args.write_data:
        emit(_write_data(Path(args.write_data[0]), int(args.write_data[1])))
        return
    import pandas as pd

    out = args.out
    if args.markdown_only is not None:
        inputs = args.markdown_only or [out]
        frame = pd.concat([pd.read_csv(f) for f in inputs], ignore_index=True)
        frame = frame.sort_values(["size", "model"], key=_model_order, kind="stable")
        out = RESULTS / "scaling.csv"
        frame.to_csv(out, index=False, float_format="%.6g")
        text = _markdown(frame, [])
        out.with_suffix(".md").write_text(text)
        print(text)
        return
    caps = {int(k): int(v) for k, v in (item.split("=") for item in args.max_batches)}
    start, source_start = uptime(), source_fingerprint(ROOT / "src" / "labeltransfer")
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"cells_{size}.h5ad"
            data, error, _ = run_child([__file__, "--write-data", str(path), str(size)])
            if error:
                sys.exit(f"writing {size} cells failed:\n{error}")
            print(f"data {size}: {json.dumps(data[0])}", flush=True)
            for name in args.models:
                config = {
                    "model": name,
                    "size": size,
                    "path": str(path),
                    "max_batches": caps.get(size),
                }
                records, error, wall = run_child(
                    [__file__, "--child", json.dumps(config)], timeout=args.timeout
                )
                if error:
                    failures.append(f"{name} {size}: {error[-3000:]}")
                    print(f"{name} {size}: FAILED after {wall:.0f} s\n{error}", flush=True)
                    continue
                row = {**records[0], **{k: v for k, v in data[0].items() if k != "n_cells"}}
                row["wall_s"] = wall
                rows.append(row)
                print(f"{name} {size} ({wall:.0f} s): {json.dumps(records[0])}", flush=True)
    end = uptime()
    frame = pd.DataFrame(rows)
    frame["machine"] = describe_machine(machine_info())
    frame["uptime_start"], frame["uptime_end"] = start, end
    frame["source_start"] = source_start["sha1"]
    frame["source_end"] = source_fingerprint(ROOT / "src" / "labeltransfer")["sha1"]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.6g")
    text = _markdown(frame, failures)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
