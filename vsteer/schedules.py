"""Scale schedules: an intervention's scale as a function of the generated-token index.

``t`` counts generated tokens: the token at position ``prompt_len`` (the first generated token,
fed back in) has ``t = 0``, the next ``t = 1``, and so on. Prompt tokens take the value at
``t = 0``. The effective scale of a scheduled intervention at a token is ``scale * value(t)``.

- ``{"kind": "constant"}``: 1 (the same as no schedule);
- ``{"kind": "linear", "from": a, "to": b, "over": N}``: ``a + (b - a) * min(t, N) / N``;
- ``{"kind": "exp", "half_life": h}``: ``0.5 ** (t / h)``;
- ``{"kind": "window", "start": s, "length": n}``: 1 for ``s <= t < s + n``, else 0.

A schedule travels to the engine as a tuple (:func:`as_tuple`); :func:`values` evaluates it for
many token indices at once (float64, numpy), the same function for the engine and the tests.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["as_tuple", "from_tuple", "values"]

Schedule = tuple  # ("linear", from, to, over) | ("exp", half_life) | ("window", start, length)


def as_tuple(spec: Mapping[str, Any] | None) -> Schedule | None:
    """The engine's form of a validated schedule (None for no schedule or ``constant``)."""
    if spec is None or spec["kind"] == "constant":
        return None
    kind = spec["kind"]
    if kind == "linear":
        return ("linear", float(spec["from"]), float(spec["to"]), int(spec["over"]))
    if kind == "exp":
        return ("exp", float(spec["half_life"]))
    if kind == "window":
        return ("window", int(spec["start"]), int(spec["length"]))
    raise ValueError(f"unknown schedule kind {kind!r}")


def from_tuple(schedule: Schedule) -> dict[str, Any]:
    """The JSON form of :func:`as_tuple`'s result."""
    kind = schedule[0]
    names = {"linear": ("from", "to", "over"), "exp": ("half_life",), "window": ("start", "length")}[kind]
    return {"kind": kind, **dict(zip(names, schedule[1:]))}


def values(schedule: Schedule | None, t: np.ndarray) -> np.ndarray:
    """The schedule's value at generated-token indices ``t`` (negative ``t``, prompt tokens,
    count as 0); float64."""
    t = np.maximum(np.asarray(t, dtype=np.float64), 0.0)
    if schedule is None:
        return np.ones_like(t)
    kind = schedule[0]
    if kind == "linear":
        _, start, end, over = schedule
        return start + (end - start) * np.minimum(t, over) / over
    if kind == "exp":
        with np.errstate(over="ignore"):  # a tiny half-life: -t / h is -inf, the value 0
            return np.exp2(-t / schedule[1])
    if kind == "window":
        _, start, length = schedule
        return ((t >= start) & (t < start + length)).astype(np.float64)
    raise ValueError(f"unknown schedule kind {kind!r}")
