"""Guards around a Lightning fit: argument checks and a clean Ctrl+C."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from numbers import Integral
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


def check_fit_args(*, max_epochs: int | None, batch_size: int | None = None) -> None:
    """Raise unless ``max_epochs`` and ``batch_size`` are positive integers (``None``: unchecked).

    Lightning reads ``max_epochs=0`` as "train nothing" (the model would then be marked
    trained with its initial weights) and ``max_epochs=-1`` as "train forever".
    """
    checks = [("max_epochs", max_epochs, 30), ("batch_size", batch_size, 128)]
    for name, value, example in checks:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(
                f"{name} must be a positive integer, got {value!r}. Pass e.g. "
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
