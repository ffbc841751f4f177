"""Command line: ``labeltransfer annotate`` and ``labeltransfer demo``.

Only the standard library is imported at start-up, so ``labeltransfer --help`` answers at
once. ``annotate`` checks every argument, path and key (from the files' ``obs``, read
without the expression matrix) before it reads data or trains, and reports a problem as one
``error: ...`` line with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    import pandas as pd
    from anndata import AnnData

#: Models of ``--model``: name -> class name in ``labeltransfer``.
MODELS = {"jind": "JIND", "scnym": "SCNYM", "scdet": "SCDET", "cellpredx": "CellPredX"}
#: Models trained on reference and query together (the others train on the reference alone).
TRANSDUCTIVE = ("scnym", "scdet", "cellpredx")
#: Accelerators of ``--accelerator`` (Lightning's names).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: Warnings that say nothing to a user of the command (Lightning internals, data loaders).
_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # cell-type names such as "CD4+/CD25 T Reg" become h5 keys; anndata only warns for now
    "Forward slashes will be disallowed",
)


def _fail(message: str) -> SystemExit:
    """Return the ``SystemExit`` that ends the command with ``error: <message>``, status 1."""
    return SystemExit(f"error: {message}")


# ------------------------------------------------------------------------ argument types
def _parse_rejection(value: str) -> str | float | None:
    if value in ("default", "openset", "per_type", "paper"):
        return value
    if value == "none":
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 <= number <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(
            "must be default, openset, per_type, paper, none or a number in [0, 1] (one "
            f"confidence cut), "
            f"got {value!r}"
        )
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value!r}")
    return number


def _key_value(value: str) -> tuple[str, str]:
    key, sep, wanted = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (e.g. batch=ctrl), got {value!r}")
    return key, wanted


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad argument as one ``error: ...`` line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


# --------------------------------------------------------------------- checks before data
@dataclass
class _Meta:
    """What a ``.h5ad`` holds besides its matrices: ``obs``, layer, ``obsm`` and ``uns`` keys."""

    obs: pd.DataFrame
    layers: list[str]
    obsm: list[str]
    uns: dict[str, Any]  # uns key -> uns[key]["method"] (None if absent)


def _check_input_file(path: str, what: str) -> None:
    if not Path(path).exists():
        raise _fail(f"the {what} file {path} does not exist.")
    if Path(path).is_dir():
        raise _fail(f"the {what} path {path} is a folder; pass an .h5ad file.")


def _read_meta(path: str, what: str) -> _Meta:
    """Read ``obs`` and the names of layers, ``obsm`` and ``uns`` entries, not the data."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as h5:
            obs = read_elem(h5["obs"])
            uns = {}
            for key in h5["uns"].keys() if "uns" in h5 else []:
                entry = h5["uns"][key]
                method = entry.get("method") if isinstance(entry, h5py.Group) else None
                uns[key] = read_elem(method) if isinstance(method, h5py.Dataset) else None
            names = {
                group: list(h5[group].keys()) if group in h5 else []
                for group in ("layers", "obsm")
            }
    except Exception as err:  # h5py/anndata raise OSError, KeyError, ... on a bad file
        raise _fail(
            f"could not read the {what} file {path} as .h5ad ({type(err).__name__}: "
            f"{_message(err)}). Pass an AnnData written with `adata.write_h5ad(path)`."
        ) from err
    return _Meta(obs=obs, layers=names["layers"], obsm=names["obsm"], uns=uns)


def _where_mask(
    meta: _Meta, where: tuple[str, str] | None, path: str, what: str
) -> np.ndarray | None:
    """Cells of ``obs[KEY] == VALUE`` (``--{what}-where``), or ``None`` for all cells."""
    if where is None:
        return None
    key, value = where
    if key not in meta.obs:
        raise _fail(
            f"--{what}-where column {key!r} is not in {path} (obs columns: "
            f"{list(meta.obs.columns)})."
        )
    column = meta.obs[key].astype(str)
    mask = (column == value).to_numpy()
    if not mask.any():
        values = sorted(column.unique())[:20]
        raise _fail(f"no cell has {key} == {value!r} (values: {values}).")
    return mask


def _check_column(meta: _Meta, key: str | None, option: str, what: str) -> None:
    if key is not None and key not in meta.obs:
        raise _fail(
            f"{option} {key!r} is not a column of the {what} (obs columns: "
            f"{list(meta.obs.columns)})."
        )


def _check_layer(meta: _Meta, layer: str | None, what: str) -> None:
    if layer is not None and layer not in meta.layers:
        raise _fail(f"--layer {layer!r} is not a layer of the {what} (layers: {meta.layers}).")


def _check_key_added(key: str, query: _Meta, registered: set[str]) -> None:
    """Refuse a ``--key-added`` whose fields would overwrite the query's own data.

    The same rule as the models' ``annotate`` (fields of a previous annotation by a model of
    this package may be overwritten, nothing else), checked on the query file before training.
    """
    from labeltransfer import _LAZY
    from labeltransfer._constants import OUTPUT_KEYS

    if "/" in key or key.startswith("_scvi"):
        raise _fail(
            f"--key-added {key!r} cannot contain '/' or start with '_scvi'; choose another."
        )
    suffixes = (OUTPUT_KEYS.PREDICTION, OUTPUT_KEYS.CONFIDENCE, OUTPUT_KEYS.REJECTED)
    written = [key, *(key + s for s in suffixes)]
    clash = sorted(registered.intersection(written))
    if clash:
        raise _fail(
            f"--key-added {key!r} would overwrite {clash}, the --labels-key/--batch-key column; "
            "choose another --key-added."
        )
    obsm = [key + OUTPUT_KEYS.PROBABILITIES, OUTPUT_KEYS.EMBEDDING_PREFIX + key]
    existing = [f"obs[{c!r}]" for c in written if c in query.obs]
    existing += [f"obsm[{n!r}]" for n in obsm if n in query.obsm]
    existing += [f"uns[{key!r}]"] if key in query.uns else []
    if existing and query.uns.get(key) not in _LAZY:
        raise _fail(
            f"--key-added {key!r} would overwrite the query's {existing}, which are not a "
            "previous annotation by labeltransfer; choose another --key-added."
        )


def _check_writable(path: Path, option: str) -> None:
    """``path`` can be created or replaced: its nearest existing folder is writable."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise _fail(f"{option} {path}: {folder} is a file, so no folder can be created under it.")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _fail(f"{option} {path} is not writable; choose a path you may write to.")


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links too); a missing path names none."""
    return Path(a).exists() and Path(b).exists() and os.path.samefile(a, b)


def _check_outputs(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for option, path in (("--query", args.query), ("--reference", args.reference)):
        if path and _same_file(out, path):
            raise _fail(
                f"--out {args.out} is the {option} file: the input is never modified. Write the "
                f"annotated copy to another file, e.g. {out.with_name(out.stem + '_annotated.h5ad')}."
            )
    if out.is_dir():
        raise _fail(
            f"--out {args.out} is a folder; pass a file path, e.g. {out / 'annotated.h5ad'}."
        )
    _check_writable(out, "--out")
    if args.overwrite and not args.save_model:
        raise _fail("--overwrite replaces the folder of --save-model; give --save-model too.")
    if args.save_model:
        _check_model_folder(Path(args.save_model), args.overwrite, "--save-model")
        if out.resolve().is_relative_to(Path(args.save_model).resolve()):
            raise _fail(
                f"--out {args.out} lies in the --save-model folder {args.save_model}; a model "
                "folder holds only the model's files. Write --out elsewhere."
            )


def _check_model_folder(path: Path, overwrite: bool, option: str) -> None:
    """Check the folder a model goes to: new, empty, or a saved model with ``overwrite``."""
    from labeltransfer._model_folder import check_save_target

    try:
        check_save_target(os.path.realpath(path), None, overwrite=True)
    except ValueError as err:
        raise _fail(f"{option} {path}: {err}") from err
    if not overwrite and (path / "model.pt").is_file():
        raise _fail(
            f"{option} {path} already holds a saved model; pass --overwrite to replace it, or "
            "choose another folder."
        )
    _check_writable(path, option)


def _check_annotate_args(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be checked without the data."""
    if not args.model_dir and not args.reference:
        raise _fail("give --reference (to train) or --model-dir (a saved model).")
    if args.model_dir:
        unused = [
            option
            for option, value in (
                ("--reference", args.reference),
                ("--reference-where", args.reference_where),
                ("--batch-key", args.batch_key),
                ("--new-identity-discovery", args.new_identity_discovery),
            )
            if value
        ]
        if unused:
            raise _fail(
                f"{', '.join(unused)} apply to training; with --model-dir the saved model maps "
                "the query (--max-epochs sets the epochs of that fit). Drop them, or drop "
                "--model-dir to train."
            )
    if args.model != "jind" and args.align:
        raise _fail(
            f"--align is JIND's query alignment; --model {args.model} adapts to the query "
            "during training (or, with --model-dir, fine-tunes on it). Drop --align."
        )
    if args.model != "jind" and args.align_epochs is not None:
        raise _fail(
            f"--align-epochs sets JIND's query alignment; drop it with --model {args.model}."
        )
    if args.align is False and args.align_epochs is not None:
        raise _fail("--align-epochs with --no-align: drop one of them.")
    if args.model != "scnym" and args.new_identity_discovery:
        raise _fail("--new-identity-discovery applies to --model scnym only.")
    _check_input_file(args.query, "query")
    if args.reference:
        _check_input_file(args.reference, "reference")
    if args.model_dir:
        model_dir = Path(args.model_dir)
        if not model_dir.is_dir():
            raise _fail(f"the --model-dir folder {args.model_dir} does not exist.")
        if not (model_dir / "model.pt").is_file():
            raise _fail(
                f"cannot load --model-dir {args.model_dir} as --model {args.model}: "
                f"{args.model_dir!r} is not a saved model: it has no model.pt. Pass the folder "
                "written by --save-model (or `model.save(...)`)."
            )
    _check_outputs(args)


def _check_annotate_data(args: argparse.Namespace) -> dict[str, np.ndarray | None]:
    """Check the keys the command names against the files' ``obs``; return the cell masks."""
    query = _read_meta(args.query, "query")
    masks = {"query": _where_mask(query, args.query_where, args.query, "query")}
    _check_column(query, args.true_key, "--true-key", "query")
    registered = set()
    if args.reference:
        reference = _read_meta(args.reference, "reference")
        masks["reference"] = _where_mask(
            reference, args.reference_where, args.reference, "reference"
        )
        _check_column(reference, args.labels_key, "--labels-key", "reference")
        _check_column(reference, args.batch_key, "--batch-key", "reference")
        _check_layer(reference, args.layer, "reference")
        registered = {args.labels_key, args.batch_key} - {None}
    _check_layer(query, args.layer, "query")
    _check_key_added(args.key_added or args.model, query, registered)
    return masks


def _check_accelerator(accelerator: str) -> None:
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise _fail(f"--accelerator {accelerator}: torch sees no GPU here; use cpu or auto.")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise _fail("--accelerator mps: torch sees no Apple GPU here; use cpu or auto.")


# ------------------------------------------------------------------------------ output
class _StderrHandler(logging.StreamHandler):
    """Plain ``%(message)s`` lines to the *current* ``sys.stderr`` (also when replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tips (``💡 Tip: ... litlogger``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def _configure_output() -> None:
    """One plain line per log event: the package's, scvi's and Lightning's, no tips.

    Called after scvi (and Lightning) are imported: scvi logs through a colour handler of
    its own and Lightning through its own handlers that also propagate, which printed
    Lightning's lines twice. Progress bars are not logging and stay.
    """
    handler = _StderrHandler()
    package = logging.getLogger("labeltransfer")
    package.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in package.handlers):
        package.addHandler(handler)
    for name in ("scvi", "lightning.pytorch", "lightning.fabric"):
        library = logging.getLogger(name)
        library.handlers = [handler]
        library.propagate = False
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in tips.filters):
        tips.addFilter(_NoTips())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one ``warning: ...`` line."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


# --------------------------------------------------------------------------- the commands
def _read(path: str, mask: np.ndarray | None, what: str) -> AnnData:
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise OSError, KeyError, ... on a bad file
        raise _fail(
            f"could not read the {what} file {path} as .h5ad ({type(err).__name__}: "
            f"{_message(err)}). Pass an AnnData written with `adata.write_h5ad(path)`."
        ) from err
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
        print(f"note: {what} cell names were not unique; made unique with a suffix.")
    return adata if mask is None else adata[mask].copy()


def _layer_as_x(adata: AnnData, layer: str | None, what: str) -> AnnData:
    """``adata`` with ``layers[layer]`` as ``X`` (a light copy), or ``adata`` itself."""
    if layer is None:
        return adata
    if layer not in adata.layers:
        raise _fail(
            f"--layer {layer!r} is not a layer of the {what} (layers: {list(adata.layers)})."
        )
    return type(adata)(X=adata.layers[layer], obs=adata.obs, var=adata.var)


def _load_model(
    cls: type,
    model_dir: str,
    model_name: str,
    layer: str | None,
    accelerator: str,
    query: AnnData,
):
    """Map the query with the saved model (``load_query_data``): a copy with the query as data."""
    from labeltransfer.base import read_saved_files

    try:
        attr_dict, _, _ = read_saved_files(model_dir, None)
    except (FileNotFoundError, ValueError) as err:
        raise _fail(
            f"cannot load --model-dir {model_dir} as --model {model_name}: {_message(err)}"
        ) from err
    saved = attr_dict.get("registry_", {}).get("model_name")
    if saved is not None and saved != cls.__name__:
        names = {v: k for k, v in MODELS.items()}
        fix = f"pass --model {names[saved]}" if saved in names else "train a model again"
        raise _fail(
            f"--model-dir {model_dir} holds a {saved} model, not a {cls.__name__} one: {fix}."
        )
    registered = attr_dict["registry_"].get("setup_args", {}).get("layer")
    if layer is not None and layer != registered:
        where = "X" if registered is None else f"layer {registered!r}"
        raise _fail(
            f"--layer {layer!r}: the model in {model_dir} reads the query's {where}; drop "
            "--layer (or pass that one)."
        )
    try:
        model = cls.load_query_data(query, model_dir, accelerator=accelerator)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        # the saved files were read above: what fails here is the query (genes, input type)
        raise _fail(_message(err)) from err
    return model


def _train_and_annotate(
    reference: AnnData | None,
    query: AnnData,
    *,
    model_name: str,
    labels_key: str,
    batch_key: str | None,
    layer: str | None,
    key_added: str,
    align: bool | None,
    new_identity_discovery: bool,
    max_epochs: int | None,
    accelerator: str,
    rejection: str | float | None,
    model_dir: str | None,
    save_model: str | None,
    overwrite: bool = False,
    align_epochs: int | None = None,
) -> dict:
    """Fit (or load) a model and annotate the query in place.

    JIND trains on the reference and (``align``, default on) aligns the query; scNym, scDET
    and CellPredX train on the reference and the unlabelled query together
    (``concat_reference_query``). With ``model_dir`` every model maps the query
    (``load_query_data``, then ``train()``: JIND's alignment, which a saved alignment of this
    query replaces and ``align=False`` skips, or the others' fine-tuning).
    """
    import labeltransfer as lt

    cls = getattr(lt, MODELS[model_name])
    timings: dict[str, float] = {}
    start = time.perf_counter()
    annotate_kwargs: dict = {}
    if model_dir:
        model = _load_model(cls, model_dir, model_name, layer, accelerator, query)
        timings["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        epochs = align_epochs or max_epochs
        fit = True
        if model_name == "jind":
            stored = None if align is False else _stored_alignment(model, query)
            annotate_kwargs["alignment"] = stored  # None: no stored alignment is applied
            fit = align is not False and stored is None
        if fit:
            model.train(
                accelerator=accelerator, **({} if epochs is None else {"max_epochs": epochs})
            )
            timings["align_s" if model_name == "jind" else "map_s"] = time.perf_counter() - start
            if model_name == "jind":
                annotate_kwargs["alignment"] = "auto"
        if save_model:
            model.save(save_model, overwrite=overwrite)
        start = time.perf_counter()
        model.annotate(query, key_added=key_added, rejection=rejection, **annotate_kwargs)
        timings["annotate_s"] = time.perf_counter() - start
        return timings
    if model_name in TRANSDUCTIVE:
        adata = lt.data.concat_reference_query(
            _layer_as_x(reference, layer, "reference"),
            _layer_as_x(query, layer, "query"),
            labels_key=labels_key,
            batch_key=batch_key,
        )
        cls.setup_anndata(
            adata, labels_key=labels_key, unlabeled_category="Unknown", batch_key=batch_key
        )
        options = (
            {"new_identity_discovery": new_identity_discovery} if new_identity_discovery else {}
        )
        model = cls(adata, **options)
    else:
        cls.setup_anndata(reference, labels_key=labels_key, batch_key=batch_key, layer=layer)
        model = cls(reference)
    kwargs = {} if max_epochs is None else {"max_epochs": max_epochs}
    model.train(accelerator=accelerator, **kwargs)
    timings["train_s"] = time.perf_counter() - start
    if model_name == "jind" and align is not False:
        start = time.perf_counter()
        epochs = {} if align_epochs is None else {"max_epochs": align_epochs}
        model.align(query, name="query", accelerator=accelerator, **epochs)
        timings["align_s"] = time.perf_counter() - start
    if save_model:
        model.save(save_model, overwrite=overwrite)
    start = time.perf_counter()
    model.annotate(query, key_added=key_added, rejection=rejection)
    timings["annotate_s"] = time.perf_counter() - start
    return timings


def _stored_alignment(model, query: AnnData) -> str | None:
    """Name of the saved JIND model's alignment of this very query (fingerprint), if any."""
    from labeltransfer.jind._alignment import select_alignment

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a near match is aligned again, silently
        name, matched_by = select_alignment(
            model.alignments_, query, "auto", model._feature_names()
        )
    return name if matched_by == "fingerprint" else None


def _summarise(query: AnnData, key: str, true_key: str | None, timings: dict) -> str:
    import labeltransfer as lt

    calls = query.obs[key].value_counts()
    lines = [f"Annotated {query.n_obs} cells (key '{key}'):"]
    lines += [f"  {name:<32s} {count:>7d}" for name, count in calls.items() if count > 0]
    lines.append(
        "Time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in timings.items())
    )
    if true_key and true_key in query.obs:
        report = lt.metrics.annotation_report(query, true_key, key)
        lines.append(lt.metrics.format_report(report))
    return "\n".join(lines)


def annotate_command(args: argparse.Namespace) -> int:
    """Run ``labeltransfer annotate``: check everything, then read, train and annotate."""
    _check_annotate_args(args)
    masks = _check_annotate_data(args)
    _check_accelerator(args.accelerator)
    import scvi

    _configure_output()
    scvi.settings.seed = args.seed
    reference = None if args.model_dir else _read(args.reference, masks["reference"], "reference")
    query = _read(args.query, masks["query"], "query")
    true_key = args.true_key or (args.labels_key if args.labels_key in query.obs else None)
    key_added = args.key_added or args.model
    timings = _train_and_annotate(
        reference,
        query,
        model_name=args.model,
        labels_key=args.labels_key,
        batch_key=args.batch_key,
        layer=args.layer,
        key_added=key_added,
        align=args.align,
        new_identity_discovery=args.new_identity_discovery,
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        rejection=args.rejection,
        model_dir=args.model_dir,
        save_model=args.save_model,
        overwrite=args.overwrite,
        align_epochs=args.align_epochs,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    query.write_h5ad(args.out)
    print(_summarise(query, key_added, true_key, timings))
    print(f"Wrote {args.out}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """Run ``labeltransfer demo`` on scanpy's bundled ``pbmc68k_reduced``."""
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise _fail(f"--out-dir {out} is a file; pass a folder.")
    _check_writable(out / "report.txt", "--out-dir")
    model_dir = out / "jind_model"
    _check_model_folder(model_dir, overwrite=True, option="the demo's model folder")
    _check_accelerator(args.accelerator)
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    import scanpy as sc
    import scvi

    import labeltransfer as lt

    _configure_output()
    scvi.settings.seed = args.seed
    out.mkdir(parents=True, exist_ok=True)
    pbmc = sc.datasets.pbmc68k_reduced()
    adata = pbmc.raw.to_adata()  # log-normalised expression of 765 genes
    adata.obs = pbmc.obs[["bulk_labels"]].copy()
    rng = np.random.default_rng(args.seed)
    is_query = rng.random(adata.n_obs) < 0.3
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    print(
        f"pbmc68k_reduced: {reference.n_obs} reference and {query.n_obs} query cells, "
        f"{adata.n_vars} genes, {adata.obs['bulk_labels'].nunique()} cell types (bulk_labels)."
    )
    timings = _train_and_annotate(
        reference,
        query,
        model_name="jind",
        labels_key="bulk_labels",
        batch_key=None,
        layer=None,
        key_added="jind",
        align=False,
        new_identity_discovery=False,
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        rejection="default",
        model_dir=None,
        save_model=str(model_dir),
        overwrite=True,  # the model of an earlier demo run in this folder
    )
    summary = _summarise(query, "jind", "bulk_labels", timings)
    print(summary)
    (out / "report.txt").write_text(summary + "\n")
    query.write_h5ad(out / "query_annotated.h5ad")
    lt.pl.confusion(query, "bulk_labels", "jind", save=out / "confusion.png")
    lt.pl.reliability(query, "bulk_labels", "jind", save=out / "reliability.png")
    print(
        f"Wrote {out / 'query_annotated.h5ad'}, {out / 'confusion.png'}, "
        f"{out / 'reliability.png'}, {out / 'report.txt'} and the model in {model_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``labeltransfer`` argument parser."""
    parser = _Parser(
        prog="labeltransfer",
        description="Transfer cell-type labels from an annotated reference to a query.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ann = sub.add_parser(
        "annotate", help="train on a reference (or load a model), annotate a query"
    )
    ann.add_argument(
        "--reference", help="reference .h5ad with labels (not needed with --model-dir)"
    )
    ann.add_argument("--query", required=True, help="query .h5ad to annotate")
    ann.add_argument("--labels-key", required=True, help="obs column of reference cell types")
    ann.add_argument(
        "--out", required=True, help="annotated query .h5ad to write (not the --query file)"
    )
    ann.add_argument("--model", default="jind", choices=list(MODELS))
    ann.add_argument("--batch-key", default=None, help="obs column of batches in the reference")
    ann.add_argument("--layer", default=None, help="layer holding the expression (default X)")
    ann.add_argument(
        "--key-added", default=None, help="prefix of the written fields (default: the model)"
    )
    ann.add_argument("--true-key", default=None, help="obs column of true query labels (report)")
    ann.add_argument(
        "--reference-where",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="keep reference cells with obs[KEY] == VALUE",
    )
    ann.add_argument(
        "--query-where",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="keep query cells with obs[KEY] == VALUE",
    )
    ann.add_argument(
        "--align",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="adversarially align the query first (JIND; on by default)",
    )
    ann.add_argument(
        "--new-identity-discovery",
        action="store_true",
        help="scNym: keep low-confidence query cells out of MixMatch and the adversary, so "
        "that cell types absent from the reference stay uncertain",
    )
    ann.add_argument(
        "--rejection",
        type=_parse_rejection,
        default="default",
        help="default (openset), openset, per_type, paper, none, or a confidence cut in [0, 1]; "
        "only openset runs the coverage test (novelty score, novel groups), the others are faster",
    )
    ann.add_argument("--accelerator", default="auto", choices=ACCELERATORS)
    ann.add_argument("--max-epochs", type=_positive_int, default=None, help="training epochs")
    ann.add_argument(
        "--align-epochs",
        type=_positive_int,
        default=None,
        help="epochs of JIND's query alignment (default: JIND's, by query size)",
    )
    ann.add_argument("--seed", type=int, default=0)
    ann.add_argument("--model-dir", default=None, help="use this saved model instead of training")
    ann.add_argument(
        "--save-model",
        default=None,
        help="also save the model to this folder (new or empty; see --overwrite)",
    )
    ann.add_argument(
        "--overwrite",
        action="store_true",
        help="let --save-model replace a model saved there before (never other files)",
    )
    ann.set_defaults(func=annotate_command)

    demo = sub.add_parser("demo", help="annotate scanpy's pbmc68k_reduced (no download)")
    demo.add_argument("--out-dir", default="demo_output")
    demo.add_argument("--max-epochs", type=_positive_int, default=None)
    demo.add_argument("--accelerator", default="auto", choices=ACCELERATORS)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=demo_command)
    return parser


def _message(err: BaseException) -> str:
    """Return the text of an exception (without the quotes ``str`` adds to a ``KeyError``)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``labeltransfer`` command.

    A bad argument ends the command with one ``error: ...`` line before any data are read
    (status 2 for what the parser refuses, 1 otherwise). Bad input found later (a
    ``ValueError``, ``KeyError``, ``TypeError`` or ``OSError`` from the library) ends it with
    ``error: <message>`` and status 1, without a traceback; Ctrl+C ends it with status 130.
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        for message in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        try:
            return args.func(args)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise _fail(_message(err)) from err
        except KeyboardInterrupt as err:
            print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
