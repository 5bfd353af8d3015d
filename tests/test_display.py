"""Display tables: what a reader sees (columns, formatting, labels, scroll box, parameters)."""

import dataclasses

import pandas as pd

from heart_lib import display as D
from heart_lib.experiments import pruning, sensitivity


def test_a_table_has_no_index_and_formats_its_cells():
    frame = pd.DataFrame({"method": ["cls_attention", "tome"], "top1": [0.8123, 0.79], "lo": [0.8, 0.78],
                          "hi": [0.82, 0.8]}, index=[56, 57])
    html = D.table(frame, {"method": lambda t: t["method"].map(D.label),
                           "top-1 (%), 95 % CI": lambda t: [D.with_interval(*r) for r in zip(t.top1, t.lo, t.hi)]}
                   ).to_html()
    assert html.startswith('<div class="heart-table" style="overflow-x:auto')  # wide tables scroll in their box
    assert ">56<" not in html and "<th>top-1 (%), 95 % CI</th>" in html
    assert "81.2 (80.0–82.0)</td>" in html and ">ToMe</td>" in html


def test_numbers_read_without_exponents_and_long_cells_fold():
    assert D.number(1.766715e-04) == "1.77e-04" and D.number(0.0123456) == "0.0123" and D.number(1234.5) == "1,234"
    assert D.with_interval(0.05, -0.01, 0.1, signed=True) == "+5.0 (-1.0 to +10.0)"
    html = D.table(pd.DataFrame({"configuration": ["tokens=0.6@3,6,9;selector=cls_attention;heads=0:2,2:0"]})).to_html()
    assert "<details><summary>" in html and "heads=0:2,2:0</code>" in html  # shortened, full text on click
    assert "<b>" not in D.table(pd.DataFrame({"x": ["<b>"]})).to_html()  # escaped


def test_every_method_of_the_study_has_one_label():
    """Labels come from the method catalogue: every score, selector and peer has one, no two alike."""
    from heart_lib import catalogue

    names = set(catalogue.SCORES) | set(catalogue.REDUCERS) | {"heart |S|"}
    for name in names:
        catalogue.label(name)  # raises for a name the catalogue does not know
    labels = [D.label(n) for n in sorted(names)]
    assert len(set(labels)) == len(labels), labels
    assert D.label("none") == D.label("unpruned") == "unpruned"
    assert D.label("tome") == catalogue.REDUCERS["tome"].label


def test_the_parameters_table_lists_every_field_with_its_meaning():
    params = dataclasses.replace(pruning.Params(), calib_limit=8)
    frame = D.params_table(params).frame
    assert list(frame["parameter"]) == [f.name for f in dataclasses.fields(pruning.Params)]
    row = frame.set_index("parameter").loc["calib_limit"]
    assert (row["this profile"], row["default"]) == ("8", "64")
    meanings = frame.set_index("parameter")["meaning"]
    assert meanings["oracle_limit"].startswith("evaluation images that also get")  # from the field's comment
    assert meanings["seed"]  # shared fields are explained once, in the display module
