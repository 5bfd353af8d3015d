import sys

from heart_lib.cli import main

sys.exit(main())
