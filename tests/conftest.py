"""Shared test configuration.

Hypothesis profiles: ``ci`` (selected when the CI environment variable is set)
runs a fixed, derandomized number of examples so that the suite's length and
outcome do not vary between runs; ``dev`` (default) is the same size but
random. ``deadline=None`` everywhere: the machine is 2 cores and noisy, and
speed is measured in benchmarks/, never in tests.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
