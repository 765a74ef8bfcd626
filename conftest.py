"""Top-level pytest configuration: loads the project's parity plugin and the hypothesis profiles."""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["parity.granite.plugin"]

# `ci`: derandomised so CI failures reproduce; `dev`: fewer examples for a quick local loop.
settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
