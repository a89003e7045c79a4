"""Config fields added after files and hashes were first written.

A field added later is left out of a saved file or a hash while it holds its default, so the
files and hashes of everything that does not use it stay byte for byte as they were. Each config
lists its later fields once (name -> default) and calls ``omit_later``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["omit_later"]


def omit_later(d: dict, later: Mapping[str, object]) -> dict:
    """``d`` without the ``later`` fields that hold their defaults (in place; returned).

    >>> omit_later({"n": 28, "dilation": 1, "pad": 2}, {"dilation": 1, "pad": 0})
    {'n': 28, 'pad': 2}
    """
    for name, default in later.items():
        if name in d and d[name] == default:
            del d[name]
    return d
