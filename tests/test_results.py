import pandas as pd
import pytest

from heart_lib import results


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "table.csv"
    results.write_table(target, pd.DataFrame({"a": [1, 2]}))
    before = target.read_text()
    with pytest.raises(RuntimeError):
        with results.atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("interrupted")
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary file left behind


def test_table_round_trip_with_metadata(tmp_path):
    target = tmp_path / "t.csv"
    results.write_table(target, pd.DataFrame({"x": [0.5, 1.5]}), meta={"params": {"seed": 3}})
    assert results.read_table(target)["x"].tolist() == [0.5, 1.5]
    meta = results.read_json(tmp_path / "t.meta.json")
    assert meta["params"] == {"seed": 3} and meta["torch"].startswith("2.13") and len(meta["library_digest"]) == 64


def test_missing_table_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the notebook"):
        results.read_table(tmp_path / "absent.csv")
