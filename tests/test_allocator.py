"""The allocator policy of fits and annotations: freed blocks are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: Allocates and frees a 20 MB array three times inside the policy's context and prints
#: whether the policy applied and the minor page faults of each allocation.
_PROBE = """
import resource, numpy as np
from labeltransfer._allocator import _libc, reused_memory
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
with reused_memory():
    for _ in range(3):
        before = faults(); block = np.ones(5_000_000, dtype=np.float32)
        counts.append(faults() - before); del block
print(_libc() is not None, *counts)
"""


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # another C library
        return False


glibc_only = pytest.mark.skipif(not _is_glibc(), reason="the policy is glibc's")


def _probe(**env: str) -> tuple[bool, list[int]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("LABELTRANSFER_MALLOC", None)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    applied, *counts = result.stdout.split()
    return applied == "True", [int(c) for c in counts]


@glibc_only
def test_a_freed_block_is_reused_by_the_next_allocation():
    applied, (first, second, _) = _probe()
    assert applied
    assert first > 0  # 20 MB of new pages (fewer faults with transparent huge pages)
    assert second <= first // 10  # the same memory again: no new pages


@glibc_only
def test_without_the_policy_the_second_block_faults_in_again():
    applied, (first, second, _) = _probe(LABELTRANSFER_MALLOC="system")
    assert not applied
    assert second > 0
    assert second >= first // 4  # glibc unmapped the first block and maps new pages


@glibc_only
def test_tunables_the_user_set_are_left_alone():
    applied, counts = _probe(MALLOC_TOP_PAD_="0")
    assert not applied
    assert min(counts) >= max(counts) // 4 > 0  # a fixed threshold: every block mapped anew
