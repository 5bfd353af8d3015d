import sys

from heart_lib.finetune.cli import run

sys.exit(run())
