"""Guards around a Lightning fit: argument checks and a clean Ctrl+C.

Every model checks its hyper-parameters with :func:`check_arguments` when it is created and
at the start of ``train()``, before any computation: a rule per argument (:class:`Number`,
:class:`OneOf`, :class:`Flag`, :class:`Widths`, :class:`Genes`) and one message format,
``"<where>: <name> must be <rule>, got <value>. Pass e.g. <name>=<default> (the default)."``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator


class Rule(Protocol):
    """What an argument must be: ``accepts(value)`` and a description (``str(rule)``)."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is valid."""


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Number:
    """A finite real number (or an integer) in a range; ``None`` too when ``optional``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is a number of this kind in the range."""
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, Integral if self.integer else Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (
            value > self.high or (self.high_open and value == self.high)
        )

    def __str__(self) -> str:
        kind = "integer" if self.integer else "number"
        if self.low is not None and self.high is not None:
            text = (
                f"a {kind} in {'(' if self.low_open else '['}{_fmt(self.low)}, "
                f"{_fmt(self.high)}{')' if self.high_open else ']'}"
            )
        elif self.low == 0:
            text = f"a {'positive' if self.low_open else 'non-negative'} {kind}"
        elif self.integer and self.low == 1 and not self.low_open:
            text = "a positive integer"
        elif self.low is not None:
            text = f"a {kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        else:
            text = f"a {kind}"
        return f"{text} or None" if self.optional else text


#: Common ranges.
POSITIVE_INT = Number(low=1, integer=True)
NON_NEGATIVE_INT = Number(low=0, integer=True)
POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
#: A probability or a fraction, ``[0, 1]``.
UNIT = Number(low=0, high=1)
#: A fraction that must leave something, ``[0, 1)`` (dropout, masking, outlier fractions).
UNIT_OPEN = Number(low=0, high=1, high_open=True)


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values."""

    choices: tuple

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is one of the choices."""
        try:
            return any(isinstance(value, type(c)) and value == c for c in self.choices)
        except (TypeError, ValueError):  # e.g. an array compared to a string
            return False

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclass(frozen=True)
class Flag:
    """``True`` or ``False``."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is a Python boolean."""
        return isinstance(value, bool)

    def __str__(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Widths:
    """A non-empty list, tuple or array of positive integers (layer widths)."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is a list, tuple or array of positive integers."""
        return (
            isinstance(value, list | tuple | np.ndarray)
            and len(value) > 0
            and all(POSITIVE_INT.accepts(v) for v in value)
        )

    def __str__(self) -> str:
        return "a non-empty list or tuple of positive integers, e.g. (512, 256)"


@dataclass(frozen=True)
class Genes:
    """``None`` or a non-empty list of distinct gene names (not a single string)."""

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is ``None`` or a list-like of distinct names."""
        if value is None:
            return True
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            return False
        names = [str(v) for v in value]
        return len(names) > 0 and len(set(names)) == len(names)

    def __str__(self) -> str:
        return "None or a non-empty list of distinct gene names (adata.var_names)"


#: Rules of the input arguments every model's constructor takes.
INPUT_RULES: dict[str, Rule] = {
    "n_top_genes": Number(low=1, integer=True, optional=True),
    "features": Genes(),
    "input_type": OneOf(("auto", "counts", "lognorm", "peaks")),
    "calibrate": Flag(),
    "confidence_threshold": Number(low=0, high=1, optional=True),
}
#: Rules of the arguments every model's ``train()`` takes.
FIT_RULES: dict[str, Rule] = {
    "max_epochs": POSITIVE_INT,
    "train_size": Number(low=0, high=1, low_open=True),
    "batch_size": POSITIVE_INT,
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "early_stopping": Flag(),
}


def _where(owner: Callable | str) -> str:
    if isinstance(owner, str):
        return owner
    name = owner.__qualname__
    return name.removesuffix(".__init__")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_arguments(
    owner: Callable | str, arguments: Mapping[str, Any], rules: Mapping[str, Rule]
) -> None:
    """Raise a ``ValueError`` for the first argument that breaks its rule.

    Parameters
    ----------
    owner
        The function (or class) whose arguments these are: its name starts the message and
        its signature gives the default suggested as the fix. A string names the owner when
        there is no signature (e.g. ``"plan_kwargs"``).
    arguments
        Argument values by name (e.g. ``locals()``); names absent from it are not checked.
    rules
        The rule of each checked argument.

    Raises
    ------
    ValueError
        ``"<owner>: <name> must be <rule>, got <value>. Pass e.g. <name>=<default> (the
        default)."``
    """
    parameters = {} if isinstance(owner, str) else inspect.signature(owner).parameters
    for name, rule in rules.items():
        if name not in arguments or rule.accepts(arguments[name]):
            continue
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        fix = (
            "Leave it out for the default."
            if default is inspect.Parameter.empty
            else f"Pass e.g. {name}={default!r} (the default)."
        )
        raise ValueError(
            f"{_where(owner)}: {name} must be {rule}, got {_short(arguments[name])}. {fix}"
        )


def check_names(
    what: str, names: Iterable[str] | None, accepted: Iterable[str], *, owner: str
) -> None:
    """Raise a ``TypeError`` naming the entries of ``names`` that are not ``accepted``.

    For the keyword dictionaries passed through to another object (``plan_kwargs``,
    ``**trainer_kwargs``): a misspelt name would otherwise fail only when that object is
    built or first used, possibly after a long computation.
    """
    accepted = set(accepted)
    unknown = sorted(set(names or ()) - accepted)
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, accepted, n=1)]
        hint = (
            f"Did you mean {', '.join(close)}?"
            if close
            else f"Accepted names: {', '.join(sorted(accepted))}."
        )
        raise TypeError(f"{owner}: unknown {what} {unknown}. Check the spelling. {hint}")


def accepted_arguments(cls: type) -> set[str]:
    """Keyword arguments ``cls(...)`` accepts, over its whole class hierarchy.

    Used for the keyword dictionaries a model passes on (``plan_kwargs`` to a training plan,
    ``datasplitter_kwargs`` to a data splitter); the object the model passes first
    (``module``, ``adata_manager``) is left out.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return names - {"self", "module", "adata_manager"}


#: Value rules of the optimiser arguments every plan inherits from scvi's ``TrainingPlan``.
PLAN_RULES: dict[str, Rule] = {
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "eps": POSITIVE,
    "lr_factor": Number(low=0, high=1, low_open=True, high_open=True),
    "lr_patience": NON_NEGATIVE_INT,
    "lr_min": NON_NEGATIVE,
    "reduce_lr_on_plateau": Flag(),
}


def check_plan_kwargs(
    plan_kwargs: Mapping[str, Any] | None, plan_cls: type, *, extra: Iterable[str] = ()
) -> None:
    """Check the names (and the optimiser values) of ``plan_kwargs`` for ``plan_cls``.

    ``extra`` are further accepted names (e.g. the fields of a loss configuration that the
    model takes out of ``plan_kwargs`` before building the plan).
    """
    check_names(
        "plan_kwargs",
        plan_kwargs,
        accepted_arguments(plan_cls) | set(extra),
        owner=f"{plan_cls.__name__} (plan_kwargs)",
    )
    check_arguments("plan_kwargs", dict(plan_kwargs or {}), PLAN_RULES)


def check_trainer_kwargs(trainer_kwargs: Mapping[str, Any], *, owner: str) -> None:
    """Raise a ``TypeError`` for ``**trainer_kwargs`` names no trainer accepts.

    Accepted: the arguments of :class:`scvi.train.Trainer`, of
    :class:`lightning.pytorch.Trainer` (which scvi's passes them on to) and of
    :class:`scvi.train.TrainRunner`.
    """
    import lightning.pytorch as pl
    from scvi.train import Trainer, TrainRunner

    accepted = {
        p.name
        for cls in (Trainer, pl.Trainer, TrainRunner)
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    } - {"self", "model", "training_plan", "data_splitter"}
    check_names("trainer argument(s)", trainer_kwargs, accepted, owner=owner)


def check_fit_args(*, max_epochs: int | None, batch_size: int | None = None) -> None:
    """Raise unless ``max_epochs`` and ``batch_size`` are positive integers (``None``: unchecked).

    Lightning reads ``max_epochs=0`` as "train nothing" (the model would then be marked
    trained with its initial weights) and ``max_epochs=-1`` as "train forever".
    """
    checks = [("max_epochs", max_epochs, 30), ("batch_size", batch_size, 128)]
    for name, value, example in checks:
        if value is not None and not POSITIVE_INT.accepts(value):
            raise ValueError(
                f"{name} must be {POSITIVE_INT}, got {value!r}. Pass e.g. "
                f"{name}={example}, or leave it out for the default."
            )


@contextmanager
def interruptible(message: str) -> Iterator[None]:
    """Turn Lightning's exit on Ctrl+C back into a ``KeyboardInterrupt`` and keep Ctrl+C working.

    On a ``KeyboardInterrupt`` during ``fit``, Lightning 2.x runs the callbacks'
    ``on_exception`` (so :class:`~labeltransfer.train.BestStateCallback` restores the best
    weights), then ignores SIGINT for the rest of the process and calls ``sys.exit(1)``. In a
    notebook that would show a ``SystemExit`` and leave the kernel deaf to later interrupts.
    Here the previous SIGINT handler is put back and a ``KeyboardInterrupt`` carrying
    ``message`` is raised instead; any other exception passes through unchanged.

    Parameters
    ----------
    message
        What the interrupted fit leaves behind and what to do next.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        yield
    except SystemExit as err:
        if isinstance(err.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(message) from err.__context__
        raise
    finally:
        if handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)
