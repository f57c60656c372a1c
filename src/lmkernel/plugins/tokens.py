"""Helpers on token lists for backend authors.

:func:`common_prefix` is what a prompt cache asks of every new prompt: how many of its first
tokens an earlier sequence already computed (the llama.cpp and MLX engines both use it).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common start of ``a`` and ``b``.

    Compares slices (in C for lists and tuples) and bisects on a mismatch: O(n log n) element
    comparisons at worst, one slice comparison when one is a prefix of the other.
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid
    return low
