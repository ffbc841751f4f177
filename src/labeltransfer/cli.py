"""Command line: ``labeltransfer annotate`` and ``labeltransfer demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

logger = logging.getLogger("labeltransfer")

#: Models of ``--model``: name -> class name in ``labeltransfer``.
MODELS = {"jind": "JIND", "scnym": "SCNYM"}


def _read(path: str, where: str | None, what: str) -> AnnData:
    import anndata as ad

    if not Path(path).exists():
        raise SystemExit(f"error: the {what} file {path} does not exist.")
    if Path(path).is_dir():
        raise SystemExit(f"error: the {what} path {path} is a folder; pass an .h5ad file.")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise OSError, KeyError, ... on a bad file
        raise SystemExit(
            f"error: could not read the {what} file {path} as .h5ad ({type(err).__name__}: "
            f"{_message(err)}). Pass an AnnData written with `adata.write_h5ad(path)`."
        ) from err
    if not adata.obs_names.is_unique:
        adata.obs_names_make_unique()
        print(f"note: {what} cell names were not unique; made unique with a suffix.")
    if where:
        key, _, value = where.partition("=")
        if key not in adata.obs:
            raise SystemExit(
                f"error: --{what}-where column {key!r} is not in {path} (obs columns: "
                f"{list(adata.obs.columns)})."
            )
        mask = (adata.obs[key].astype(str) == value).to_numpy()
        if not mask.any():
            values = sorted(adata.obs[key].astype(str).unique())[:20]
            raise SystemExit(f"error: no cell has {key} == {value!r} (values: {values}).")
        adata = adata[mask].copy()
    return adata


def _parse_rejection(value: str) -> str | float | None:
    if value in ("per_type", "default"):
        return value
    if value == "none":
        return None
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--rejection must be per_type, none or a number in [0, 1], got {value!r}"
        ) from err


def _layer_as_x(adata: AnnData, layer: str | None, what: str) -> AnnData:
    """``adata`` with ``layers[layer]`` as ``X`` (a light copy), or ``adata`` itself."""
    if layer is None:
        return adata
    if layer not in adata.layers:
        raise SystemExit(
            f"error: --layer {layer!r} is not a layer of the {what} (layers: "
            f"{list(adata.layers)})."
        )
    return type(adata)(X=adata.layers[layer], obs=adata.obs, var=adata.var)


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
    align_epochs: int | None = None,
) -> dict:
    """Fit (or load) a model and annotate the query in place.

    JIND trains on the reference and (``align``, default on) aligns the query; scNym trains
    on the reference and the unlabelled query together (``concat_reference_query``).
    """
    import labeltransfer as lt

    if model_name not in MODELS:
        raise SystemExit(f"error: unknown model {model_name!r}; choose from {list(MODELS)}.")
    if model_name != "jind" and align:
        raise SystemExit(
            "error: --align is JIND's query alignment; scNym adapts to the query during "
            "training. Drop --align."
        )
    if model_name != "scnym" and new_identity_discovery:
        raise SystemExit("error: --new-identity-discovery applies to --model scnym only.")
    cls = getattr(lt, MODELS[model_name])
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if model_dir:
        if not Path(model_dir).is_dir():
            raise SystemExit(f"error: the --model-dir folder {model_dir} does not exist.")
        try:
            model = cls.load(model_dir, accelerator=accelerator)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(
                f"error: cannot load --model-dir {model_dir} as --model {model_name}: "
                f"{_message(err)}"
            ) from err
    else:
        if labels_key not in reference.obs:
            raise SystemExit(
                f"error: --labels-key {labels_key!r} is not a column of the reference (obs "
                f"columns: {list(reference.obs.columns)})."
            )
        if model_name == "scnym":
            adata = lt.data.concat_reference_query(
                _layer_as_x(reference, layer, "reference"),
                _layer_as_x(query, layer, "query"),
                labels_key=labels_key,
                batch_key=batch_key,
            )
            cls.setup_anndata(
                adata, labels_key=labels_key, unlabeled_category="Unknown", batch_key=batch_key
            )
            model = cls(adata, new_identity_discovery=new_identity_discovery)
        else:
            cls.setup_anndata(reference, labels_key=labels_key, batch_key=batch_key, layer=layer)
            model = cls(reference)
        kwargs = {} if max_epochs is None else {"max_epochs": max_epochs}
        model.train(accelerator=accelerator, **kwargs)
    timings["load_s" if model_dir else "train_s"] = time.perf_counter() - start
    if model_name == "jind" and align is not False:
        start = time.perf_counter()
        epochs = {} if align_epochs is None else {"max_epochs": align_epochs}
        model.align(query, name="query", accelerator=accelerator, **epochs)
        timings["align_s"] = time.perf_counter() - start
    if save_model:
        model.save(save_model, overwrite=True)
    start = time.perf_counter()
    model.annotate(query, key_added=key_added, rejection=rejection)
    timings["annotate_s"] = time.perf_counter() - start
    return timings


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
    """Run ``labeltransfer annotate``."""
    import scvi

    scvi.settings.seed = args.seed
    reference = (
        None if args.model_dir else _read(args.reference, args.reference_where, "reference")
    )
    query = _read(args.query, args.query_where, "query")
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
        align_epochs=args.align_epochs,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    query.write_h5ad(args.out)
    print(_summarise(query, key_added, true_key, timings))
    print(f"Wrote {args.out}")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """Run ``labeltransfer demo`` on scanpy's bundled ``pbmc68k_reduced``."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc
    import scvi

    import labeltransfer as lt

    scvi.settings.seed = args.seed
    out = Path(args.out_dir)
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
        save_model=str(out / "jind_model"),
    )
    summary = _summarise(query, "jind", "bulk_labels", timings)
    print(summary)
    (out / "report.txt").write_text(summary + "\n")
    query.write_h5ad(out / "query_annotated.h5ad")
    lt.pl.confusion(query, "bulk_labels", "jind", save=out / "confusion.png")
    lt.pl.reliability(query, "bulk_labels", "jind", save=out / "reliability.png")
    print(
        f"Wrote {out / 'query_annotated.h5ad'}, {out / 'confusion.png'}, "
        f"{out / 'reliability.png'}, {out / 'report.txt'} and the model in {out / 'jind_model'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the ``labeltransfer`` argument parser."""
    parser = argparse.ArgumentParser(
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
    ann.add_argument("--out", required=True, help="annotated query .h5ad to write")
    ann.add_argument("--model", default="jind", choices=list(MODELS))
    ann.add_argument("--batch-key", default=None, help="obs column of batches in the reference")
    ann.add_argument("--layer", default=None, help="layer holding the expression (default X)")
    ann.add_argument(
        "--key-added", default=None, help="prefix of the written fields (default: the model)"
    )
    ann.add_argument("--true-key", default=None, help="obs column of true query labels (report)")
    ann.add_argument("--reference-where", default=None, help="keep reference cells with KEY=VALUE")
    ann.add_argument("--query-where", default=None, help="keep query cells with KEY=VALUE")
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
    ann.add_argument("--rejection", type=_parse_rejection, default="default")
    ann.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    ann.add_argument("--max-epochs", type=int, default=None, help="training epochs")
    ann.add_argument(
        "--align-epochs",
        type=int,
        default=None,
        help="epochs of JIND's query alignment (default: JIND's, by query size)",
    )
    ann.add_argument("--seed", type=int, default=0)
    ann.add_argument("--model-dir", default=None, help="use this saved model instead of training")
    ann.add_argument("--save-model", default=None, help="also save the model to this folder")
    ann.set_defaults(func=annotate_command)

    demo = sub.add_parser("demo", help="annotate scanpy's pbmc68k_reduced (no download)")
    demo.add_argument("--out-dir", default="demo_output")
    demo.add_argument("--max-epochs", type=int, default=None)
    demo.add_argument("--accelerator", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=demo_command)
    return parser


def _message(err: BaseException) -> str:
    """Return the text of an exception (without the quotes ``str`` adds to a ``KeyError``)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``labeltransfer`` command.

    Bad input (a ``ValueError``, ``KeyError``, ``TypeError`` or ``FileNotFoundError`` from
    the library) ends the command with ``error: <message>`` and exit status 1, without a
    traceback; Ctrl+C ends it with status 130.
    """
    args = build_parser().parse_args(argv)
    if args.command == "annotate" and not args.model_dir and not args.reference:
        raise SystemExit("error: give --reference (to train) or --model-dir (a saved model).")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # cell-type names such as "CD4+/CD25 T Reg" become h5 keys; anndata only warns for now
    warnings.filterwarnings("ignore", message="Forward slashes will be disallowed")
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        raise SystemExit(f"error: {_message(err)}") from err
    except KeyboardInterrupt as err:
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
