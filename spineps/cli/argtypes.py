"""argparse ``type=`` converters shared by every parser of the app (pure, no heavy imports)."""

from __future__ import annotations

import argparse
import operator
from typing import Callable, Optional, TypeVar

__all__ = ["number", "positive_int", "nonneg_int", "positive_float", "nonneg_float", "vertebra_level"]

N = TypeVar("N", int, float)


def number(kind: Callable[[str], N], what: str, *, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], N]:
    """A converter that parses ``kind`` and checks ``low <= value <= high`` (strict where
    ``*_open``); the error says ``expected <what>, got '<text>'``."""
    above = operator.gt if low_open else operator.ge
    below = operator.lt if high_open else operator.le

    def convert(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (low is not None and not above(value, low)) or (high is not None and not below(value, high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    convert.__name__ = what.replace(" ", "_")
    return convert


positive_int = number(int, "a positive integer", low=1)
nonneg_int = number(int, "an integer >= 0", low=0)
positive_float = number(float, "a positive number", low=0, low_open=True)
nonneg_float = number(float, "a number >= 0", low=0)


def vertebra_level(text: str) -> str:
    """A vertebra name (``C1``..``C7``, ``T1``..``T13``, ``L1``..``L6``; any case), returned
    upper case; the sacrum is refused (it is never the top vertebra of a view)."""
    from spineps.labels import vertebra_value  # data-only module

    try:
        value = vertebra_value(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected a vertebra name such as C2, T12 or L1, got {text!r}") from None
    if value == 26:
        raise argparse.ArgumentTypeError("the sacrum cannot be the top vertebra in view")
    return text.strip().upper()
