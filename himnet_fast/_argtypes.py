"""argparse types for the numeric options of the ``himnet-fast`` subcommands: a bad value stops
the parse with one line naming the option and what was expected (``argument --epochs: expected
an integer >= 1, got 0``), before anything runs or is written."""
from __future__ import annotations

import argparse
import math
from typing import Optional


def integer(low: int, high: Optional[int] = None):
    """An integer in [low, high) (no upper bound when ``high`` is None)."""
    want = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a limit in seconds or GB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


POSITIVE = integer(1)
SEED = integer(0, 2 ** 32)  # numpy's global RNG takes 32-bit seeds
