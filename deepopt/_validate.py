"""Argument checks shared by every spec: each error names the argument, the value and what is allowed."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

# torch.optim's wording for the same checks, kept at the front of ours so that existing
# knowledge (and tests written against torch) transfer: "Invalid momentum value: -0.5 (...)".
TORCH_PHRASES = {
    "lr": "Invalid learning rate",
    "momentum": "Invalid momentum value",
    "dampening": "Invalid dampening value",
    "weight_decay": "Invalid weight_decay value",
    "eps": "Invalid epsilon value",
    "betas[0]": "Invalid beta parameter at index 0",
    "betas[1]": "Invalid beta parameter at index 1",
    "betas[2]": "Invalid beta parameter at index 2",
}


def _with_phrase(name: str, value: Any, message: str) -> str:
    phrase = TORCH_PHRASES.get(name)
    return f"{phrase}: {value!r} ({message})" if phrase else message


def _is_real(value: Any) -> bool:
    if type(value) is float or type(value) is int:     # the common case, without the ABC check
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """Return ``float(value)`` if it is a finite real in the interval, else raise ``ValueError``."""
    def interval() -> str:
        return (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
                + ("inf" if high is None else f"{high:g}") + (")" if high_open else "]"))

    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(_with_phrase(name, value, f"{name}={value!r} is invalid: expected a finite real "
                                                   f"number in {interval()}"))
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise ValueError(_with_phrase(name, value, f"{name}={value!r} is out of range: allowed {interval()}"))
    return v


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` if it is an int in ``[low, high]``, else raise ``ValueError``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: expected an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value!r} is out of range: allowed integers in [{lo}, {hi}]")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: expected True or False")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {', '.join(map(repr, choices))}")
    return value


def kernel_for(table: dict, part: Any, where: str) -> Any:
    """``table[type(part)]``: the kernel a backend registered for a part's class, else a
    ``NotImplementedError`` naming the class and the table to add it to (``where``)."""
    try:
        return table[type(part)]
    except KeyError:
        raise NotImplementedError(f"{type(part).__name__} has no kernel in {where}; add an entry for it "
                                  "there (docs/extending.md)") from None
