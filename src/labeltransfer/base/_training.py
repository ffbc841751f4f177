"""Training shared by every model: one ``train()`` around scvi's TrainRunner.

``TrainingMixin.train`` is a template method, as scvi's SOLO and SysVI forward to the runner:
it checks the arguments (``train/_guards.py``), counts the query cells, builds the data
splitter once, sets the early-stopping defaults, fits the model's training plan with scvi's
:class:`~scvi.train.TrainRunner`, records ``training_summary_`` and fits the open-set layer.
A model supplies its arguments and their defaults (:attr:`TrainingMixin._train_arguments`,
from which each model class gets its own documented ``train`` signature), its training plan
(:meth:`TrainingMixin._training_plan`) and hooks for what only it does.
"""

from __future__ import annotations

import inspect
import logging
import types
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

from scvi import settings
from scvi.model._utils import get_max_epochs_heuristic, use_distributed_sampler
from scvi.train import TrainRunner
from scvi.utils._docstrings import devices_dsp

from labeltransfer.dataloaders import RefQueryDataSplitter, labelled_mask
from labeltransfer.dataloaders._data_splitting import NO_TRAINING_DATA
from labeltransfer.train import BestStateCallback
from labeltransfer.train._callbacks import ReturnTrainingState, restore_training_state
from labeltransfer.train._guards import (
    FIT_RULES,
    Rule,
    check_arguments,
    check_fit_args,
    check_plan_kwargs,
    check_trainer_kwargs,
    interruptible,
)

logger = logging.getLogger(__name__)

#: Message of the ``KeyboardInterrupt`` raised when ``train()`` is interrupted.
_INTERRUPTED = (
    "Training was interrupted; the model is left untrained (annotate() and predict() refuse "
    "it). Call model.train() again."
)
#: Arguments every model's ``train()`` ends with, after its own (:attr:`_train_arguments`).
_COMMON_ARGUMENTS: dict[str, tuple[Any, Any]] = {
    "accelerator": (str, "auto"),
    "devices": (int | list[int] | str, "auto"),
    "plan_kwargs": (dict | None, None),
    "datasplitter_kwargs": (dict | None, None),
}


def _train_signature(cls: type) -> inspect.Signature:
    """``train(self, max_epochs, *, <the model's arguments>, accelerator, ..., **trainer_kwargs)``."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for i, (name, (annotation, default)) in enumerate(
        {**cls._train_arguments, **_COMMON_ARGUMENTS}.items()
    ):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if i == 0 else keyword
        params.append(inspect.Parameter(name, kind, default=default, annotation=annotation))
    params.append(inspect.Parameter("trainer_kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params, return_annotation=None)


def size_scaled_budget(arguments: dict[str, Any], n_cells: int, paper_epochs: int) -> float:
    """Fill a default ``max_epochs`` as scvi-tools' models do; return the schedules' scale.

    ``max_epochs=None`` becomes :func:`scvi.model._utils.get_max_epochs_heuristic` of
    ``n_cells`` (the registered cells) with ``paper_epochs`` as its cap (the paper's budget
    up to 20,000 cells, fewer above), and the returned factor (that budget over
    ``paper_epochs``) scales the model's schedules counted in epochs (:func:`scaled_epochs`).
    An explicit ``max_epochs`` keeps the paper's schedules: the factor is 1.
    """
    if arguments["max_epochs"] is not None:
        return 1.0
    arguments["max_epochs"] = get_max_epochs_heuristic(n_cells, paper_epochs)
    return arguments["max_epochs"] / paper_epochs


def scaled_epochs(paper: float, scale: float, low: int = 1) -> int:
    """Return a schedule of ``paper`` epochs scaled with the budget, rounded, at least ``low``."""
    return max(round(paper * scale), low)


class TrainingMixin:
    """Fit a model's training plan with scvi's runner, then its open-set layer."""

    #: The model's ``train()`` arguments before the common ones: name -> (annotation,
    #: default), ``max_epochs`` first (the only positional one). A model class that sets it
    #: gets a ``train`` with this signature and :attr:`_train_doc` as its docstring.
    _train_arguments: ClassVar[dict[str, tuple[Any, Any]]] = {}
    #: Docstring of the model's ``train`` (``%(param_accelerator)s`` and
    #: ``%(param_devices)s`` are filled in by scvi's ``devices_dsp``).
    _train_doc: ClassVar[str] = ""
    #: Valid values of the ``train()`` arguments, checked before any computation.
    _train_rules: ClassVar[dict[str, Rule]] = FIT_RULES
    #: The training plan class: ``plan_kwargs`` names are checked against it.
    _plan_cls: ClassVar[type]
    #: Further accepted ``plan_kwargs`` names (the fields of a loss configuration).
    _plan_extra: ClassVar[frozenset[str]] = frozenset()
    #: Value rules of ``plan_kwargs`` entries (their defaults are the plan's).
    _plan_rules: ClassVar[dict[str, Rule]] = {}
    #: Whether the model trains on the unlabelled query cells too.
    _uses_query: ClassVar[bool] = True
    #: Whether training without query cells is an error (else a warning).
    _query_required: ClassVar[bool] = False
    #: The error or warning when no query cell is registered.
    _no_query_message: ClassVar[str] = ""
    #: Keep the last epoch's weights instead of the best validation accuracy's.
    _keep_final_weights: ClassVar[bool] = False
    #: Splitter built by :meth:`train`; a model may use a subclass (CellPredX adds the query
    #: cells' kNN neighbours to its query minibatches).
    _splitter_cls: type[RefQueryDataSplitter] = RefQueryDataSplitter
    #: Whether the held-out reference cells also join the unlabelled query minibatches (see
    #: ``RefQueryDataSplitter``): where co-training raises the query's confidence, thresholds
    #: fitted on reference cells the model never trained on would reject too few query cells.
    _validation_in_query_stream: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_train_arguments" not in vars(cls):
            return
        # the template's code under the model's own name, signature and docstring
        template = TrainingMixin.train
        train = types.FunctionType(
            template.__code__, template.__globals__, "train", None, template.__closure__
        )
        train.__signature__ = _train_signature(cls)
        train.__qualname__ = f"{cls.__qualname__}.train"
        train.__module__ = cls.__module__
        train.__doc__ = cls._train_doc
        cls.train = devices_dsp.dedent(train)

    def train(self, *args, **kwargs) -> None:
        """Train the model (each model documents its arguments: ``help(Model.train)``).

        The steps every model shares: argument checks (before any computation), the count of
        query cells (an error or a warning when there are none), the model's set-up
        (:meth:`_prepare_training`), one stratified
        :class:`~labeltransfer.dataloaders.RefQueryDataSplitter`, the model's warm-up
        (:meth:`_before_training`), its training plan (:meth:`_training_plan`), the
        early-stopping defaults, scvi's TrainRunner keeping the best-validation-accuracy
        epoch, ``training_summary_`` (updated by :meth:`_after_training`) and the open-set
        layer fitted on the held-out reference cells, then the reference codes saved for
        mapping (:meth:`~labeltransfer.base.ReferenceMappingMixin._fit_reference_codes`),
        and the model's check of the fit (:meth:`_check_fit`), which may ask for a refit.

        On a model from ``load_query_data`` it fits the query instead (``_fit_query``: JIND's
        alignment, or the encoder's fine-tuning); only ``max_epochs``, ``batch_size``, the
        device arguments and ``plan_kwargs`` apply.

        A DDP ``strategy`` shards every set across the processes (``batch_size`` is per
        process). With a spawning launcher (``"ddp_spawn"``, ``"ddp_notebook"``) the epoch
        count and the callbacks' states come back to this process with the weights
        (``ReturnTrainingState`` in ``labeltransfer.train``). An exception or Ctrl+C during
        the fit leaves the model marked untrained (its module holds the best weights seen so
        far, but no calibration or thresholds were fitted): the exception propagates, and
        Ctrl+C raises a ``KeyboardInterrupt``.
        """
        if self.adata is None:  # loaded without data: fail before any other check
            raise ValueError(NO_TRAINING_DATA)
        owner = type(self).train
        bound = inspect.signature(owner).bind(self, *args, **kwargs)
        explicit = set(bound.arguments) - {"self", "trainer_kwargs"}
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        trainer_kwargs = arguments.pop("trainer_kwargs")
        if getattr(self, "query_mapping_", None) is not None:  # from load_query_data
            check_trainer_kwargs(trainer_kwargs, owner=owner.__qualname__)
            self._train_mapped(arguments, explicit, trainer_kwargs)
            return
        plan_kwargs = arguments["plan_kwargs"]
        check_arguments(owner, arguments, self._train_rules)
        check_plan_kwargs(plan_kwargs, self._plan_cls, extra=self._plan_extra)
        check_arguments(self._plan_cls.__init__, dict(plan_kwargs or {}), self._plan_rules)
        check_trainer_kwargs(trainer_kwargs, owner=owner.__qualname__)
        self._check_training(arguments)
        options = self._plan_options(arguments)

        n_query = int((~labelled_mask(self.adata_manager)).sum()) if self._uses_query else 0
        if self._uses_query and n_query == 0:
            if self._query_required:
                raise ValueError(self._no_query_message)
            logger.warning(self._no_query_message)
        arguments["n_query"] = n_query
        arguments["use_query"] = n_query > 0
        self._prepare_training(arguments, options)
        max_epochs, batch_size = arguments["max_epochs"], arguments["batch_size"]
        check_fit_args(max_epochs=max_epochs, batch_size=batch_size)

        splitter = self._splitter_cls(
            self.adata_manager,
            train_size=arguments["train_size"],
            use_query=arguments["use_query"],
            batch_size=batch_size,
            distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy", "auto")),
            **{
                "validation_in_query_stream": self._validation_in_query_stream,
                **self._splitter_kwargs(arguments),
                **(arguments["datasplitter_kwargs"] or {}),
            },
        )
        splitter.setup()  # seeded, so the runner's setup gives the same split
        self._before_training(splitter, arguments, options, trainer_kwargs)
        plan = self._training_plan(options)

        warmup = self._warmup_epochs(arguments)
        if arguments.get("early_stopping") and "early_stopping_monitor" in arguments:
            monitor = self._early_stopping_monitor(arguments, plan)
            trainer_kwargs.setdefault("early_stopping", True)
            trainer_kwargs.setdefault("early_stopping_monitor", monitor)
            trainer_kwargs.setdefault(
                "early_stopping_patience", arguments["early_stopping_patience"]
            )
            if warmup:
                trainer_kwargs.setdefault("early_stopping_warmup_epochs", warmup)
            trainer_kwargs.setdefault(
                "early_stopping_mode", "max" if "accuracy" in monitor else "min"
            )
        # no epoch is "best" on the reference alone for some models: keep the final weights
        best_warmup = max_epochs if self._keep_final_weights else min(warmup, max_epochs - 1)
        best = BestStateCallback("validation_accuracy", mode="max", warmup_epochs=best_warmup)
        trainer_kwargs["callbacks"] = [
            *trainer_kwargs.get("callbacks", []),
            best,
            ReturnTrainingState(),
        ]
        if splitter.val_idx.size > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        else:  # nothing to monitor: early stopping would fail on the missing metric
            trainer_kwargs["early_stopping"] = False
        runner = TrainRunner(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=arguments["accelerator"],
            devices=arguments["devices"],
            **trainer_kwargs,
        )
        try:
            with interruptible(_INTERRUPTED), self._training_context():
                runner()
        except BaseException:
            self.is_trained_ = False  # never half-trained: annotate() asks for train() again
            raise
        restore_training_state(runner.trainer)
        self._fit_reference_statistics()
        self.training_summary_ = {
            "seed": settings.seed,
            "max_epochs": max_epochs,
            "best_epoch": best.best_epoch,
            "best_validation_accuracy": best.best_score,
            "n_train": int(splitter.ref_train_idx.size),
            "n_validation": int(splitter.val_idx.size),
            "batch_size": batch_size,
        }
        if self._uses_query:
            epochs_trained = int(self.trainer.current_epoch)
            self.training_summary_.update(
                {
                    "epochs_trained": epochs_trained,
                    "early_stopped": epochs_trained < max_epochs,
                    "n_query": n_query,
                }
            )
        self._fit_rejection(splitter.val_idx)
        self._fit_reference_codes()
        self.training_summary_.update(self._after_training(arguments, plan))
        entries, refit = self._check_fit(arguments)
        if refit:  # the model set itself up for a fit that replaces this one
            self.train(*args, **kwargs)
        self.training_summary_.update(entries)

    # ------------------------------------------------------------------ hooks
    def _check_training(self, arguments: dict[str, Any]) -> None:
        """Raise for what the argument rules cannot see (after them, before any computation)."""

    def _plan_options(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Return the training plan's keyword arguments: ``lr``, ``weight_decay``, ``plan_kwargs``.

        Called before any computation: a model that builds a loss configuration from
        ``plan_kwargs`` builds (and so validates) it here.
        """
        return {
            "lr": arguments["lr"],
            "weight_decay": arguments["weight_decay"],
            **(arguments["plan_kwargs"] or {}),
        }

    def _prepare_training(self, arguments: dict[str, Any], options: dict[str, Any]) -> None:
        """Compute what the splitter needs, or ``max_epochs`` (may update ``arguments``)."""

    def _splitter_kwargs(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Return the model's own keyword arguments of :attr:`_splitter_cls`."""
        return {}

    def _before_training(
        self,
        splitter: RefQueryDataSplitter,
        arguments: dict[str, Any],
        options: dict[str, Any],
        trainer_kwargs: dict[str, Any],
    ) -> None:
        """Run on the set-up splitter before the plan is built (e.g. a warm-up stage)."""

    def _training_plan(self, options: dict[str, Any]) -> Any:
        """Build the training plan from :meth:`_plan_options`'s keyword arguments."""
        return self._plan_cls(self.module, **options)

    def _warmup_epochs(self, arguments: dict[str, Any]) -> int:
        """Return the epochs before early stopping and best-epoch selection start."""
        return 0

    def _early_stopping_monitor(self, arguments: dict[str, Any], plan: Any) -> str:
        """Return the metric early stopping watches."""
        return arguments["early_stopping_monitor"]

    def _training_context(self) -> AbstractContextManager:
        """Return the context the fit runs in (e.g. parameters frozen during it)."""
        return nullcontext()

    def _after_training(self, arguments: dict[str, Any], plan: Any) -> dict[str, Any]:
        """Run after the open-set layer is fitted; return ``training_summary_`` entries."""
        return {}

    def _check_fit(self, arguments: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Check the finished fit; return ``training_summary_`` entries and whether to refit.

        A refit means the model rejected the fit and has set itself up for another (scDET
        without the novel classes that failed their coverage check): :meth:`train` then runs
        again with the same arguments.
        """
        return {}, False
