"""Shared pytest configuration: hypothesis profiles.

* ``ci``  — bounded example counts, no deadline (torch's first call is slow);
  loaded automatically when ``CI`` is set (hypothesis would otherwise pick its
  own built-in ``ci`` profile, which we override here).
* ``dev`` — the default locally: a few more examples, still no deadline.
* ``thorough`` — for hunting bugs (``tox -e thorough``, not in CI): randomised
  (a fresh seed every run, printed with any failure), 2000 examples per property,
  and the example database on, so a failure found once is replayed first next time.
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
    max_examples=2000,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

_default = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))
