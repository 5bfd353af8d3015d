"""Entry point of one fresh-process run: `python -m heart_lib.measure.worker SPEC.json RESULT.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m heart_lib.measure.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    import heart_lib  # noqa: F401 - before timm (torchvision compatibility)
    from heart_lib import results
    from heart_lib.measure.run import RunSpec, measure_one

    spec = RunSpec(**json.loads(Path(argv[0]).read_text()))
    row, raw = measure_one(spec)
    results.write_json(argv[1], {"row": row, "raw": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
