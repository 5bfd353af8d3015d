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


def test_staging_redirects_only_the_chapter_being_rewritten(tmp_path, monkeypatch):
    # While the runner executes `claims`, its folder is a staging copy; what claims reads of the other
    # chapters (through results_root) stays the final folders.
    from heart_lib.paths import results_root

    monkeypatch.setenv("HEART_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv(results.STAGE_FOR_ENV, str(tmp_path / "results" / "p" / "claims"))
    monkeypatch.setenv(results.STAGE_TO_ENV, str(tmp_path / "stage" / "claims"))
    assert results.results_dir("p", "claims") == tmp_path / "stage" / "claims"
    assert results.results_dir("p", "claims", "figures") == tmp_path / "stage" / "claims" / "figures"
    assert results.results_dir("p", "baseline") == tmp_path / "results" / "p" / "baseline"
    assert results.results_dir("p", "claimsX") == tmp_path / "results" / "p" / "claimsX"
    assert results_root() / "p" / "claims" == tmp_path / "results" / "p" / "claims"
