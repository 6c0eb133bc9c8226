"""Hypothesis strategies shared by the property tests: odd small shapes and float64 values."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

small = st.integers(min_value=1, max_value=5)
dims = st.integers(min_value=2, max_value=6)


def arrays(shape, lo=-3.0, hi=3.0):
    """float64 arrays with bounded finite values; shape entries may be ints or strategies."""
    if any(isinstance(d, st.SearchStrategy) for d in shape):
        shape = st.tuples(*(d if isinstance(d, st.SearchStrategy) else st.just(d) for d in shape))
    return hnp.arrays(np.float64, shape,
                      elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64))


@st.composite
def grid(draw, C=None):
    """A channels-last grid (N, H, W, C)."""
    shape = (draw(small), draw(dims), draw(dims), C or draw(dims))
    return draw(arrays(shape))


@st.composite
def simplex(draw, n, lo=1e-3):
    """A positive probability vector of length n."""
    x = draw(arrays((n,), lo, 1.0))
    return x / x.sum()


seeds = st.integers(min_value=0, max_value=2**31 - 1)
