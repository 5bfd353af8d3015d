"""What a verdict is: the four values, one claim's row, the row of a claim whose results are
missing, and where an interval lies against a threshold. The claims page and every chapter that
judges its own claims (CAMP-HiVe's) share these, so a chapter need not import the claims page."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from heart_lib.paths import PROJECT_ROOT

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not testable here")


@dataclass(frozen=True)
class Row:
    claim: str
    statement: str
    paper: str
    ours: str
    setting: str
    criterion: str
    verdict: str
    chapter: str
    differs: str = ""  # how our setting differs from the paper's (model, data, resolution, epochs, device)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def missing(claim: str, statement: str, paper: str, chapter: str, path: Path) -> Row:
    """The row of a claim whose result file was not written: it names the file, it does not guess."""
    shown = path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT) else path
    return Row(claim, statement, paper, f"no result: {shown} was not written", "", "", "not testable here", chapter)


def interval_relation(lo: float, hi: float, threshold: float = 0.0) -> str:
    """Where an interval lies against a threshold: 'above', 'below' or 'overlap'."""
    return "above" if lo > threshold else "below" if hi < threshold else "overlap"


def above(lo: float, hi: float, threshold: float = 0.0) -> str:
    """The verdict of one interval that must lie above a threshold: reproduced, not reproduced when it
    lies below, inconclusive when it straddles."""
    return {"above": "reproduced", "below": "not reproduced"}.get(interval_relation(lo, hi, threshold), "inconclusive")


def combine(outcomes: list[str]) -> str:
    """A verdict from parts that must all hold: every part reproduced, one failed, or otherwise open."""
    if outcomes and all(o == "reproduced" for o in outcomes):
        return "reproduced"
    return "not reproduced" if "not reproduced" in outcomes else "inconclusive"
