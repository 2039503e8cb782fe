"""Shared pytest configuration: the Hypothesis profiles used by every property test.

`ci` (the default) keeps the whole suite within a few minutes on 2 cores with a cold Numba
cache; `dev` explores more.  Pick one with HYPOTHESIS_PROFILE=dev.
"""

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # the first example of a test pays for Numba compilation
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("dev", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
