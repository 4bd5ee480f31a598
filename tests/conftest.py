import os

from hypothesis import settings

# CI runs a fixed set of examples (reproducible); locally hypothesis explores new ones each run.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
