"""Keep the freed memory of one minibatch for the next: glibc's allocator policy during a fit.

Every minibatch allocates the same large blocks (a densified 512-cell x 2,000-gene batch is
4 MB; activations and gradients are of that order) and frees them a few milliseconds later.
glibc's ``malloc`` serves blocks above its *mmap threshold* with fresh pages from the system
and returns them on ``free``; its dynamic threshold and the trimming of the heap's top hand
them back often enough that every step pays the page faults of touching new memory again.
PyTorch's CPU performance guide recommends jemalloc or tcmalloc for the same reason; this
needs no preloaded library.

During :meth:`~labeltransfer.base.TrainingMixin.train` (and the extra training stages) and
every annotation or prediction the allocator (glibc only) serves blocks up to
:data:`MMAP_THRESHOLD` from its heap and keeps up to :data:`TRIM_THRESHOLD` of freed memory
at the heap's top; when the call ends, the freed memory is returned to the system
(``malloc_trim``). The thresholds stay set for the rest of the process (glibc cannot go back to
its dynamic threshold). A process whose ``MALLOC_*_`` tunables or ``GLIBC_TUNABLES`` are set
in its environment, or whose C library is not glibc, is left as it is; so is every process
when the environment variable ``LABELTRANSFER_MALLOC=system`` is set.

Measured (100,000 cells, one thread, one epoch): CellPredX 6.0 -> 3.3 s in the scaling
suite, with its attention computed as a logistic (4.7-5.5 s with that alone, single runs);
JIND, scNym and scDET within their run-to-run noise. A third tunable, a 64 MB heap growth
(``M_TOP_PAD``), trained no faster and added 0.1x the query's CSR to scNym's annotation of
200,000 cells (0.65-0.68x against 0.48x without it): it is not set.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

#: ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap: glibc's own ceiling for its dynamic threshold on
#: 64-bit systems (a 1,024-cell x 2,000-gene float32 batch is 8 MB).
MMAP_THRESHOLD = 32 * 1024**2
#: Freed memory at the heap's top kept for the next minibatch.
TRIM_THRESHOLD = 128 * 1024**2
_SETTINGS = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
#: Environment tunables of glibc: set by the user, they are left alone.
_GLIBC_TUNABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "GLIBC_TUNABLES",
)


@cache
def _libc() -> ctypes.CDLL | None:
    """Return the C library with the policy set (once), or ``None`` where it does not apply."""
    if os.environ.get("LABELTRANSFER_MALLOC", "").lower() == "system":
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
    except (ValueError, OSError, AttributeError):  # no such name: not glibc
        return None
    if any(name in os.environ for name in _GLIBC_TUNABLES):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 (used when a call ends)
        applied = all(libc.mallopt(p, v) == 1 for p, v in _SETTINGS)
    except (OSError, AttributeError):
        return None
    return libc if applied else None  # mallopt returns 1 on success


@contextmanager
def reused_memory() -> Iterator[None]:
    """Run a fit or an annotation with the policy above; return the freed memory after it."""
    libc = _libc()
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
