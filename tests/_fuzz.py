"""Hypothesis strategies shared by the HTTP fuzz tests: numbers across the whole range of their
types (subnormals to 1e308, -0.0, NaN, infinities, integers of 400 digits, int32/int64/float32 edges)."""

from __future__ import annotations

EDGE_NUMBERS = [0, -1, -0.0, 1e308, -1e308, 5e-324, 1e-300, 2**63, 2**63 - 1, -(2**63) - 1, 1e4, 1.00001e4,
                2**31 - 1, 2**31, 3e38, 3.5e38, 1e39, 1e6, 1.000001e6, 10**400]


def numbers():
    """Any JSON number a client can send, edges first."""
    from hypothesis import strategies as st

    return (st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.integers(-(10**400), 10**400)
            | st.sampled_from(EDGE_NUMBERS))
