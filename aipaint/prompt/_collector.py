"""Pause Python's cycle collector while a parser builds many small objects.

Parsing a megabyte of prompt syntax makes a few hundred thousand tuples and strings, none of
them in a reference cycle. The cycle collector still walks them again and again as they pile
up (a quarter to a half of the parse time of the largest inputs in ``benchmarks/parsers.py``).
Parsers run inside :func:`collector_paused`; nesting and threads are counted, so the collector
comes back on when the last parser running leaves, and only if it was on when the first came in.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_lock = threading.Lock()
_depth = 0
_was_enabled = False

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def collector_paused() -> Iterator[None]:
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def without_collector(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run inside :func:`collector_paused`."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with collector_paused():
            return function(*args, **kwargs)

    return wrapper
