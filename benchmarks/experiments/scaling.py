"""Scaling of the four models: train time per epoch, annotation throughput, peak memory, FLOPs.

For each size (10,000, 100,000 and 1,000,000 cells x 2,000 genes) a first child writes one
synthetic data set (``lt.data.synthetic``: raw counts, CSR float32, 10 seen types plus one
novel type in the query, library size 500, about 300 non-zero genes per cell; half the cells
the labelled reference, half the unlabelled query) to an h5ad file. Each model then runs in a
fresh child (one torch thread) that

1. reads the file and sets the model up on all cells (scDET is told ``n_novel=1``, which
   skips its warm-up);
2. resets the peak memory and trains for one epoch (at 1,000,000 cells only the first
   200 batches run (`MAX_BATCHES`); the training part of the epoch is scaled by
   ``batches per epoch / batches run`` and the complete validation pass added);
3. resets the peak again and annotates all cells (in memory);
4. annotates the query half (at most 200,000 cells) as a new AnnData with its genes in
   reverse order and the ``"per_type"`` rule (confidence thresholds, no coverage test),
   three times, the peak reset before each (the fastest call and the largest memory), and
   times a plain-torch forward of the same layer shapes (the ``nn.Linear`` layers
   ``module.inference`` calls, in order, each followed by a ReLU, on dense batches of 1,024
   cells with random inputs): the bound annotation is compared with (issue 18, point 2).

Every ``nn.Linear`` call is counted by a forward hook (``2 * in * out`` per row): the forward
arithmetic per cell of ``module.inference`` and the forward arithmetic of a training step;
training is taken as 3x its forward. Dividing by the measured times gives the achieved FLOP/s,
next to a ``torch.mm`` of the first layer's shape in the same process.

The hooks also record the shape of every ``nn.Linear`` call of the epoch that ran (rows, in,
out, and whether autograd tracks it and its input): the *training bound* is the plain-torch
time of those same calls on dense random inputs, each followed by a ReLU, with the backward
pass (weight and, where the model needs it, input gradients) for the calls under autograd and
the forward only for the others (pseudo-labels, validation). Training throughput as a
fraction of that bound is the bound's seconds over the epoch's measured seconds (issue 18,
point 2): what remains is data loading, densifying and normalising, augmentation, the
non-linear layers, the losses and the optimiser.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import Stopwatch, csr_mib, peak_rss_mb, reset_peak_rss, rss_mb, training_meter
from _writer import number

from experiments import Experiment

if TYPE_CHECKING:
    import pandas as pd

GENES, TYPES, LIBRARY = 2000, 10, 500.0
MODELS = ("JIND", "SCNYM", "SCDET", "CellPredX")
SIZES = {"quick": (2_000,), "small": (10_000, 100_000), "full": (10_000, 100_000, 1_000_000)}
#: Training batches run at a size (the rest of the epoch is scaled).
MAX_BATCHES = {1_000_000: 200}
#: Query cells annotated with their genes reordered (issue 18's 200,000), and how often.
REORDERED_CELLS, REORDERED_REPEATS = 200_000, 3


def configs(budget: str, seeds: list[int], workdir: Path) -> list[dict[str, Any]]:
    """Per size: write the data, then run each model on it."""
    out = []
    for size in SIZES[budget]:
        path = str(workdir / f"cells_{size}.h5ad")
        out.append({"step": "data", "size": size, "path": path})
        out += [
            {
                "step": "model",
                "model": m,
                "size": size,
                "path": path,
                "max_batches": MAX_BATCHES.get(size),
            }
            for m in MODELS
        ]
    return out


def _write_data(config: dict[str, Any]) -> dict[str, Any]:
    import labeltransfer as lt

    start = time.perf_counter()
    n_cells = config["size"]
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
    adata.write_h5ad(config["path"])
    return {
        "nnz_per_cell": float(adata.X.nnz / adata.n_obs),
        "generate_s": time.perf_counter() - start,
        "file_gib": Path(config["path"]).stat().st_size / 2**30,
    }


class LinearFlops:
    """Count ``2 * rows * in * out`` for every ``nn.Linear`` call of a module (forward hooks)."""

    def __init__(self, module) -> None:
        import torch

        self.grad = 0  # calls under autograd (training forward)
        self.no_grad = 0
        self.shapes: list[tuple[int, int]] = []  # (in, out) of each call without autograd
        #: every call while ``recording`` by (rows, in, out, under autograd, input gradient)
        self.calls: Counter[tuple[int, int, int, bool, bool]] = Counter()
        self.recording = False
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in module.modules()
            if isinstance(m, torch.nn.Linear)
        ]

    def _hook(self, layer, inputs, output) -> None:
        import torch

        x = inputs[0]
        rows, grad = x.numel() // x.shape[-1], torch.is_grad_enabled()
        if self.recording:
            self.calls[rows, layer.in_features, layer.out_features, grad, x.requires_grad] += 1
        flops = 2 * rows * layer.in_features * layer.out_features
        if grad:
            self.grad += flops
        else:
            self.no_grad += flops
            self.shapes.append((layer.in_features, layer.out_features))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def epoch_recorder(self):
        """A Lightning callback that records the calls of the training epochs only.

        The same window as :func:`_common.training_meter`'s epoch time (validation included;
        the fitting after training, e.g. of the open-set layer, left out).
        """
        import lightning.pytorch as pl

        counter = self

        class EpochRecorder(pl.Callback):
            def on_train_epoch_start(self, trainer, pl_module) -> None:
                counter.recording = True

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                counter.recording = False

        return EpochRecorder()


def _inference_layers(model) -> tuple[float, list[tuple[int, int]]]:
    """Forward arithmetic of ``module.inference`` per cell, and its layers' shapes in call order.

    Measured on one minibatch of 256 cells.
    """
    import torch

    model.module.eval()
    loader = model._make_data_loader(adata=model.adata, indices=range(256), batch_size=256)
    tensors = next(iter(loader))
    counter = LinearFlops(model.module)
    with torch.inference_mode():
        model.module.inference(**model.module._get_inference_input(tensors))
    counter.remove()
    return counter.no_grad / 256, counter.shapes


def _torch_bound_cells_per_s(shapes: list[tuple[int, int]], repeats: int = 20) -> float:
    """Cells per second of a plain-torch forward through ``shapes`` on dense 1,024-cell batches.

    Every layer gets its own random input of its width (the layers of a model do not all
    chain), followed by a ReLU: the arithmetic of the network and nothing else.
    """
    import torch

    layers = [torch.nn.Linear(n_in, n_out) for n_in, n_out in shapes]
    inputs = [torch.randn(1024, n_in) for n_in, _ in shapes]

    def forward() -> None:
        for layer, x in zip(layers, inputs, strict=True):
            torch.relu(layer(x))

    with torch.inference_mode():
        wall, _ = _repeat_seconds(forward, repeats)
    return 1024 * repeats / wall


def _torch_train_bound_s(calls: Counter, repeats: int = 5) -> float:
    """Plain-torch seconds of ``calls`` (:class:`LinearFlops`), backward where they had one.

    Each distinct call is timed on its own (random dense input of its rows, a ReLU after it;
    under autograd the backward of the output as well, with the input's gradient where the
    model's input needed one) and weighted by how often it occurred.
    """
    import torch

    total = 0.0
    for (rows, n_in, n_out, grad, input_grad), count in calls.items():
        layer = torch.nn.Linear(n_in, n_out)
        x = torch.randn(rows, n_in, requires_grad=grad and input_grad)
        if grad:
            upstream = torch.ones(rows, n_out)

            def call(layer=layer, x=x, upstream=upstream) -> None:
                layer.zero_grad(set_to_none=True)
                x.grad = None
                torch.relu(layer(x)).backward(upstream)

        else:

            def call(layer=layer, x=x) -> None:
                with torch.no_grad():
                    torch.relu(layer(x))

        wall, _ = _repeat_seconds(call, repeats)
        total += count * wall / repeats
    return total


def _annotate_reordered(model, adata) -> dict[str, Any]:
    """Annotate the query half, genes reversed, with ``"per_type"``: time and added memory.

    At most :data:`REORDERED_CELLS` query cells; the fastest of :data:`REORDERED_REPEATS`
    calls and the largest memory any of them added (the peak reset before each).
    """
    query = adata[adata.obs["cell_type"] == "Unknown"]
    query = query[:REORDERED_CELLS, query.var_names[::-1]].copy()
    seconds, cpu, added = [], [], []
    for _ in range(REORDERED_REPEATS):
        before = rss_mb()
        reset = reset_peak_rss()
        sw = Stopwatch()
        with sw("fast_annotate"):
            model.annotate(query, rejection="per_type", key_added="fast")
        added.append(peak_rss_mb() - before)
        seconds.append(sw.seconds["fast_annotate"])
        cpu.append(sw.cpu_seconds["fast_annotate"])
    best = seconds.index(min(seconds))
    return {
        "fast_n_cells": int(query.n_obs),
        "fast_query_csr_mib": csr_mib(query.X),
        "fast_peak_reset": reset,
        "fast_added_mib": max(added),
        "fast_cells_per_s": query.n_obs / seconds[best],
        "fast_annotate_s": seconds[best],
        "fast_annotate_cpu_s": cpu[best],
    }


def _matmul_gflops(rows: int, n_in: int, n_out: int, repeats: int = 20) -> tuple[float, float]:
    """GFLOP per wall second and per CPU second of ``torch.mm`` at a first layer's shape."""
    import torch

    a, b = torch.randn(rows, n_in), torch.randn(n_in, n_out)
    wall, cpu = _repeat_seconds(lambda: torch.mm(a, b), repeats)
    flops = 2 * rows * n_in * n_out * repeats / 1e9
    return flops / wall, flops / cpu


def _repeat_seconds(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Wall and process CPU seconds of ``repeats`` calls, after one untimed warm-up call."""
    call()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        call()
    return time.perf_counter() - start, time.process_time() - cpu


def _run_model(config: dict[str, Any]) -> dict[str, Any]:
    import anndata as ad
    import scvi
    import torch

    import labeltransfer as lt

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    scvi.settings.seed = 0
    sw = Stopwatch()
    name = config["model"]
    with sw("read"):
        adata = ad.read_h5ad(config["path"])
    with sw("setup"):
        cls = getattr(lt, name)
        cls.setup_anndata(adata, labels_key="cell_type", unlabeled_category="Unknown")
        model = cls(adata, n_novel=1) if name == "SCDET" else cls(adata)
    record: dict[str, Any] = {"rss_after_setup_mb": rss_mb(), "peak_rss_setup_mb": peak_rss_mb()}
    record["peak_reset"] = reset_peak_rss()
    meter = training_meter()
    counter = LinearFlops(model.module)
    extra: dict[str, Any] = {"early_stopping": False} if name in ("SCNYM", "SCDET") else {}
    if config["max_batches"]:
        extra["limit_train_batches"] = int(config["max_batches"])
    with sw("train"):
        model.train(
            max_epochs=1,
            accelerator="cpu",
            enable_progress_bar=False,
            callbacks=[meter, counter.epoch_recorder()],
            **extra,
        )
    counter.remove()
    record["peak_rss_train_mb"] = peak_rss_mb()
    trainer = model.trainer
    batches_run = int(trainer.num_training_batches)
    batches_epoch = int(len(trainer.datamodule.train_dataloader()))
    epoch_measured = meter.epochs[0]
    val_s = min(meter.validation_s, epoch_measured)
    flops_per_cell, shapes = _inference_layers(model)
    scale = batches_epoch / batches_run if batches_run else math.nan
    record.update(
        batches_run=batches_run,
        batches_per_epoch=batches_epoch,
        batch_size=int(model.training_summary_.get("batch_size") or 0),
        epoch_measured_s=epoch_measured,
        validation_s=val_s,
        epoch_s=(epoch_measured - val_s) * scale + val_s,
        train_steps_per_s=batches_run / (epoch_measured - val_s),
        train_forward_flops_per_step=counter.grad / batches_run if batches_run else math.nan,
        train_bound_s=_torch_train_bound_s(counter.calls),
        infer_flops_per_cell=flops_per_cell,
        rss_before_annotate_mb=rss_mb(),  # includes memory training freed but kept
        peak_reset_annotate=reset_peak_rss(),
    )
    with sw("annotate"):
        model.annotate()
    record["peak_rss_annotate_mb"] = peak_rss_mb()
    record.update(_annotate_reordered(model, adata))
    record["torch_bound_cells_per_s"] = _torch_bound_cells_per_s(shapes)
    first = next(m for m in model.module.modules() if isinstance(m, torch.nn.Linear))
    record["matmul_gflops"], record["matmul_gflops_cpu"] = _matmul_gflops(
        1024, first.in_features, first.out_features
    )
    record.update(sw.record())
    record.update(
        n_cells=int(adata.n_obs),
        annotate_cells_per_s=adata.n_obs / sw.seconds["annotate"],
        load_1min=os.getloadavg()[0],
    )
    return record


def child(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Write one data set, or run one model on it."""
    record = {k: config[k] for k in ("step", "size")}
    if config["step"] == "data":
        return [{**record, **_write_data(config)}]
    return [{**record, "model": config["model"], **_run_model(config)}]


def sections(frame: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """Time and memory per model and size, then the arithmetic and the achieved FLOP/s."""
    runs = frame[frame["step"] == "model"].copy()
    if runs.empty:
        return ["No model run finished."]
    cpu_train = runs["train_cpu_s"] / runs["train_s"]
    cpu_annotate = runs["annotate_cpu_s"] / runs["annotate_s"]
    runs["epoch_cpu_s"] = runs["epoch_s"] * cpu_train
    runs["annotate_cells_per_cpu_s"] = runs["n_cells"] / runs["annotate_cpu_s"]
    runs["train_gflops"] = (
        3 * runs["train_forward_flops_per_step"] * runs["train_steps_per_s"] / 1e9
    )
    runs["infer_gflops"] = runs["infer_flops_per_cell"] * runs["annotate_cells_per_s"] / 1e9
    lines = [
        "One torch thread per run; every run a fresh process. `(scaled)`: only the first "
        "batches of the epoch ran; its training part was multiplied by batches per epoch / "
        "batches run and the complete validation pass added. CPU/wall is the process CPU time over wall "
        "time: 1.0 means the run had its core to itself, less that it waited for a CPU on a "
        "shared machine; `epoch CPU s` = epoch s x train CPU/wall and `cells per CPU s` = "
        "cells / annotation CPU seconds estimate what one idle core would take.",
        "",
        "| model | cells | batches run / per epoch | epoch s | epoch CPU s (est.) "
        "| train steps/s | peak RSS train MiB | annotate s | annotate cells/s "
        "| annotate cells per CPU s | peak RSS annotate MiB | setup s "
        "| CPU/wall train, annotate | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, train, annotate in zip(runs.to_dict("records"), cpu_train, cpu_annotate, strict=True):
        scaled = "" if r["batches_run"] == r["batches_per_epoch"] else " (scaled)"
        lines.append(
            f"| {r['model']} | {r['n_cells']:,.0f} | {r['batches_run']:,.0f} / "
            f"{r['batches_per_epoch']:,.0f} | {number(r['epoch_s'])}{scaled} "
            f"| {number(r['epoch_cpu_s'])} | {number(r['train_steps_per_s'])} "
            f"| {number(r['peak_rss_train_mb'], 0)} | {number(r['annotate_s'])} "
            f"| {number(r['annotate_cells_per_s'], 0)} | {number(r['annotate_cells_per_cpu_s'], 0)} "
            f"| {number(r['peak_rss_annotate_mb'], 0)} | {number(r['setup_s'])} "
            f"| {train:.2f}, {annotate:.2f} | {number(r['load_1min'], 2)} |"
        )
    lines += [
        "",
        "## Arithmetic per cell and achieved FLOP/s",
        "",
        "| model | cells | inference MFLOP/cell | annotate GFLOP/s | train MFLOP/step (fwd) "
        "| batch size | train GFLOP/s (3x fwd) | torch.mm GFLOP/s (per CPU s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.to_dict("records"):
        lines.append(
            f"| {r['model']} | {r['n_cells']:,.0f} | {r['infer_flops_per_cell'] / 1e6:.2f} "
            f"| {number(r['infer_gflops'], 2)} | {r['train_forward_flops_per_step'] / 1e6:,.0f} "
            f"| {r['batch_size']:.0f} | {number(r['train_gflops'], 2)} "
            f"| {number(r['matmul_gflops'])} ({number(r['matmul_gflops_cpu'])}) |"
        )
    if "train_bound_s" in runs:
        lines += _train_bound_section(runs)
    if "fast_cells_per_s" in runs:
        lines += _reordered_section(runs)
    data = frame[frame["step"] == "data"]
    lines += [
        "",
        "Data sets: "
        + "; ".join(
            f"{r['size']:,.0f} cells, {r['nnz_per_cell']:.0f} non-zero genes per cell, "
            f"{r['file_gib']:.2f} GiB, written in {r['generate_s']:.0f} s"
            for r in data.to_dict("records")
        )
        + ".",
        "",
    ]
    return lines


def _train_bound_section(runs: pd.DataFrame) -> list[str]:
    """The epoch that ran against the plain-torch time of its ``nn.Linear`` calls."""
    lines = [
        "",
        "## Training against its plain-torch bound",
        "",
        "*Measured*: the epoch as it ran (the batches run and the validation pass). *Bound*: "
        "the same `nn.Linear` calls (rows, in, out) in plain torch on dense random inputs, "
        "each with a ReLU, with their backward pass where they had one (see above). "
        "*Fraction* = bound / measured: the share of the epoch that is the layers' arithmetic.",
        "",
        "| model | cells | batches run | measured s | bound s | fraction of bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs.to_dict("records"):
        lines.append(
            f"| {r['model']} | {r['n_cells']:,.0f} | {r['batches_run']:,.0f} "
            f"| {number(r['epoch_measured_s'])} | {number(r['train_bound_s'])} "
            f"| {r['train_bound_s'] / r['epoch_measured_s']:.2f} |"
        )
    return lines


def _reordered_section(runs: pd.DataFrame) -> list[str]:
    """Annotation of the reordered query against the plain-torch bound, and its added memory."""
    lines = [
        "",
        "## Annotating a new query with its genes in another order",
        "",
        "The query half (at most 200,000 cells) as a new AnnData, genes in reverse order (CSR in "
        "memory), "
        '`annotate(rejection="per_type")`: reindexed, normalised and passed through the network '
        "chunk by chunk, without the coverage test. *Bound*: a plain-torch forward of the same "
        "`nn.Linear` shapes (each with a ReLU) on dense 1,024-cell batches in the same process, "
        "one thread. *Added*: peak RSS during the call minus RSS before it, outputs included, "
        "against the query's CSR size.",
        "",
        "| model | query cells | annotate s | cells/s | bound cells/s | fraction of bound "
        "| CPU/wall | added MiB | query CSR MiB | added / CSR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs.to_dict("records"):
        lines.append(
            f"| {r['model']} | {r['fast_n_cells']:,.0f} | {number(r['fast_annotate_s'])} "
            f"| {number(r['fast_cells_per_s'], 0)} | {number(r['torch_bound_cells_per_s'], 0)} "
            f"| {r['fast_cells_per_s'] / r['torch_bound_cells_per_s']:.2f} "
            f"| {r['fast_annotate_cpu_s'] / r['fast_annotate_s']:.2f} "
            f"| {number(r['fast_added_mib'], 0)} | {number(r['fast_query_csr_mib'], 0)} "
            f"| {r['fast_added_mib'] / r['fast_query_csr_mib']:.2f} |"
        )
    return lines


EXPERIMENT = Experiment(
    title="Scaling on CPU",
    about=__doc__,
    sections=sections,
    configs=configs,
    child=child,
    seeds=(0,),
    sequential=True,
)
