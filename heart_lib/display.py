"""Tables as a reader sees them: chosen columns, no index, formatted numbers, one label per method.

Every chapter's display functions build a `Table` here, so the look of tables (and the names of
methods) is the same across the book. A `Table` renders as HTML inside its own scrolling box, so a
table wider than the text column scrolls instead of running off the page; long configuration strings
are shortened, with the full text one click away (`<details>`).
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import io
import re
import tokenize
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

# Names in result tables that are no method of the catalogue.
OTHER_LABELS = {"unpruned": "unpruned", "none": "unpruned", "dense": "unpruned"}


def label(name: str) -> str:
    """The book's one label for a method name used in the result tables: the catalogue's (the name
    itself when neither the catalogue nor OTHER_LABELS knows it)."""
    from heart_lib import catalogue

    name = str(name)
    if name in OTHER_LABELS:
        return OTHER_LABELS[name]
    try:
        return catalogue.label(name)
    except ValueError:
        return name


# ------------------------------------------------------------------------------------------ numbers


def percent(x: float, digits: int = 1) -> str:
    """A fraction as a percentage without the sign: 0.1234 -> '12.3'."""
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def with_interval(value: float, lo: float, hi: float, digits: int = 1, scale: float = 100.0,
                  signed: bool = False) -> str:
    """'12.3 (11.0–13.5)': a value and its interval, scaled (percentages by default)."""
    if value is None or not np.isfinite(value):
        return "–"
    cell = f"{{:{'+' if signed else ''}.{digits}f}}".format
    return f"{cell(scale * value)} ({cell(scale * lo)}{' to ' if signed else '–'}{cell(scale * hi)})"


def number(x: Any, digits: int = 3) -> str:
    """A float with `digits` significant figures and no exponent for ordinary magnitudes."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e6:
        decimals = max(0, digits - 1 - int(np.floor(np.log10(abs(x)))))
        return f"{x:,.{decimals}f}"
    return f"{x:.{digits - 1}e}"


# ------------------------------------------------------------------------------------------ tables


NOWRAP_CHARS = 24  # cells up to this long (numbers, labels) stay on one line; longer text wraps


def _cell(value: Any, max_chars: int) -> str:
    """One <td>: short cells unbroken, long ones wrapped, very long ones shortened with the rest on click."""
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
    if len(text) <= NOWRAP_CHARS:
        return f'<td style="white-space:nowrap">{html.escape(text)}</td>'
    if len(text) <= max_chars:
        return f"<td>{html.escape(text)}</td>"
    short = html.escape(text[: max_chars - 1].rstrip() + "…")
    return f"<td><details><summary>{short}</summary><code>{html.escape(text)}</code></details></td>"


@dataclasses.dataclass(frozen=True)
class Table:
    """A display table: a frame of already formatted cells, rendered as HTML in a scrolling box."""

    frame: pd.DataFrame
    max_chars: int = 36  # longer cells are shortened, the full text opens on click
    caption: str = ""

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.frame.columns)
        body = "".join("<tr>" + "".join(_cell(v, self.max_chars) for v in row) + "</tr>"
                       for row in self.frame.itertuples(index=False))
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        # The inline style keeps the scroll box even where the book's stylesheet is absent (Jupyter).
        return (f'<div class="heart-table" style="overflow-x:auto;max-width:100%">'
                f'<table class="table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:  # what a plain-text front end shows: the table, never an object repr
        return self.frame.to_string(index=False)

    def __len__(self) -> int:
        return len(self.frame)


def table(frame: pd.DataFrame, columns: dict[str, str | Callable[[pd.DataFrame], Iterable]] | None = None,
          max_chars: int = 36, caption: str = "") -> Table:
    """A `Table` of `frame`: `columns` maps each shown header to a source column or to a function of
    the frame giving the formatted cells (None: every column, numbers formatted)."""
    if columns is None:
        shown = frame.reset_index(drop=True).copy()
        for name in shown.columns:
            if pd.api.types.is_numeric_dtype(shown[name]) and not pd.api.types.is_bool_dtype(shown[name]):
                shown[name] = shown[name].map(number)
        return Table(shown, max_chars, caption)
    cells = {header: (list(source(frame)) if callable(source) else list(frame[source]))
             for header, source in columns.items()}
    return Table(pd.DataFrame(cells), max_chars, caption)


# ------------------------------------------------------------------------------------------ parameters


def field_meanings(cls: type) -> dict[str, str]:
    """Meaning of each field of a Params dataclass, from the comment on its line (one place per chapter)."""
    meanings: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return meanings
    names = {f.name for f in dataclasses.fields(cls)}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            match = re.match(r"\s*(\w+)\s*:", token.line)
            if match and match.group(1) in names and match.group(1) not in meanings:
                meanings[match.group(1)] = token.string.lstrip("#").strip()
    return meanings


# Fields every chapter shares, explained once here; a chapter's own comment on a field wins.
COMMON_MEANINGS = {
    "profile": "the parameter set this page was executed with",
    "model": "timm model name",
    "weights": "none | mirror | hub | auto | path to a state_dict",
    "dataset": "evaluation images (a name in data/manifest.yaml)",
    "data_path": "folder for datasets that are not in the mirror",
    "limit": "a seeded subset of this many images (– = all)",
    "batch_size": "images per forward pass",
    "seed": "the one seed every random choice derives from",
    "num_classes": "classifier size when not the model's own (– = the model's)",
    "model_kwargs": "extra timm.create_model arguments",
    "bootstrap": "bootstrap resamples for the 95 % intervals",
    "reuse": "reuse stored results computed with the same parameters",
}


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) if value else "(none)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def params_table(params: Any) -> Table:
    """'Parameters of this page': name, value in this profile, default and meaning of every field."""
    cls = type(params)
    meanings = field_meanings(cls)
    rows = [{"parameter": f.name, "this profile": _value(getattr(params, f.name)), "default": _value(_default(f)),
             "meaning": meanings.get(f.name, COMMON_MEANINGS.get(f.name, ""))} for f in dataclasses.fields(cls)]
    return Table(pd.DataFrame(rows), max_chars=60)
