"""Shared test set-up: hypothesis profiles and the array-module parametrisation.

Profiles (after MyGrad's): ``HYPOTHESIS_PROFILE=dev`` (few examples, fast) or ``ci``
(the default; more examples, no deadline because the first call of a numpy path can be slow).
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from omh_ref.core import backend
from omh_ref.core.backend import gpu_available

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cupy_param():
    return pytest.param("cupy", marks=pytest.mark.skipif(not gpu_available(),
                                                          reason="CuPy with a CUDA device is not available"))


@pytest.fixture(params=["numpy", "strict", _cupy_param()])
def xp(request):
    """The array module under test: numpy; the strict CuPy stand-in (omh_ref.core.strict_device:
    device arrays that fail where CuPy's would, NumPy's arithmetic), with ``--device gpu``
    meaning it for the test's duration; and cupy where a GPU is present."""
    if request.param == "numpy":
        yield np
    elif request.param == "strict":
        with backend.strict_device() as sxp:
            yield sxp
    else:
        import cupy

        yield cupy
