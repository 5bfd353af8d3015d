"""`python -m heart_lib.measure ...`: the same as `python -m heart_lib measure ...`."""

import sys

from heart_lib.measure.cli import run_cli

sys.exit(run_cli())
