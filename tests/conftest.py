"""Shared pytest configuration: hypothesis profiles.

* ``ci``  — bounded example counts, no deadline (torch's first call is slow);
  loaded automatically when ``CI`` is set (hypothesis would otherwise pick its
  own built-in ``ci`` profile, which we override here).
* ``dev`` — the default locally: a few more examples, still no deadline.
* ``thorough`` — for hunting bugs by hand: ``HYPOTHESIS_PROFILE=thorough``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_default = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))
