"""LLM measurement: protocol maths, selection, bad input, and a whole sweep of a two-layer random GPT-NeoX."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import heart_lib  # noqa: F401 - torchvision shim before transformers
from heart_lib import cli
from heart_lib.measure import energy, llm, llm_tables, select


def test_phase_timing_splits_prefill_from_decode():
    # call at 0, prompt stamped at 0.01, first token at 0.5, then three more 0.1 s apart
    figures = llm.phase_timing(0.0, [0.01, 0.5, 0.6, 0.7, 0.8], batch_size=2)
    assert figures["new_tokens_generated"] == 4
    assert figures["ttft_ms"] == pytest.approx(500)
    assert figures["decode_ms_per_token"] == pytest.approx(100)
    assert figures["decode_tokens_per_s"] == pytest.approx(2 * 3 / 0.3)
    assert figures["tokens_per_s"] == pytest.approx(2 * 4 / 0.8)
    with pytest.raises(ValueError, match="stamps"):
        llm.phase_timing(0.0, [0.1], 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        llm.phase_timing(0.0, [0.1, 0.3, 0.2], 1)


def test_overhead_fraction_is_relative_to_bare_median():
    assert llm.overhead_fraction([1.02, 1.02, 5.0], [1.0, 0.9, 1.1]) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        llm.overhead_fraction([], [1.0])


def test_phase_energy_subtracts_idle_power():
    # 2 W idle for 1 s, then 5 W for 2 s of generation: 10 J total, 6 J above idle, 4 tokens
    trace = energy.Trace(kind="power", times=list(np.arange(0, 3.01, 0.1)),
                         values=[2.0 if t < 1.0 - 1e-9 else 5.0 for t in np.arange(0, 3.01, 0.1)])
    out = llm.phase_energy(trace, {"generate": (1.0, 3.0)}, {"generate": 4}, (0.0, 0.9), None)
    assert out["energy_j"] == pytest.approx(10.0)
    assert out["energy_above_idle_j"] == pytest.approx(6.0)
    assert out["energy_per_token_j"] == pytest.approx(2.5)
    assert out["peak_power_w"] == 5.0 and out["energy_status"] == "ok"


def _summary():
    return pd.DataFrame({"device_name": ["a", "a", "a"], "model": ["m1", "m2", "m3"], "dtype": "fp32",
                         "tokens_per_s": [10.0, 30.0, 50.0], "peak_memory_mb": [100.0, 300.0, 900.0],
                         "generate_s": [1.0, 2.0, 3.0], "energy_per_token_j": [0.1, np.nan, 0.3],
                         "peak_power_w": [5.0, 6.0, 7.0]})


def test_selection_under_limits_and_unmeasured_limits_fail():
    summary = _summary()
    best = select.select_best(summary, select.Limits(max_memory_mb=500))
    assert best["model"] == "m2"
    # m2 has no energy figure: under an energy limit it cannot be shown to qualify
    assert select.select_best(summary, select.Limits(max_energy_j=0.2))["model"] == "m1"
    broken = select.violations(summary, select.Limits(max_energy_j=0.2, max_power_w=6.5))
    assert broken.iloc[0] == "" and "not measured" in broken.iloc[1] and "peak_power_w" in broken.iloc[2]
    assert select.select_best(summary, select.Limits(max_latency_s=0.5)) is None
    with pytest.raises(ValueError, match="max_power_w"):
        select.Limits(max_power_w=-1).check()


def test_pareto_front_keeps_only_undominated_points():
    x = np.array([1.0, 2.0, 2.0, 3.0, np.nan])  # memory: lower is better
    y = np.array([1.0, 3.0, 2.0, 3.0, 9.0])  # tokens/s: higher is better
    assert select.pareto_front(x, y).tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("change, message", [
    ({"model": "gpt-2"}, "model = 'gpt-2': unknown"),
    ({"batch_size": 0}, "batch_size = 0"),
    ({"prompt_tokens": 250, "new_tokens": 10}, "exceeds the context"),
    ({"dtype": "int4"}, "dtype = 'int4'"),
    ({"dtype": "fp16"}, "dtype = 'fp16'"),
    ({"weights": "/no/such/folder"}, "weights = '/no/such/folder'"),
])
def test_bad_input_names_the_parameter(change, message):
    spec = llm.LlmSpec(**{"model": llm.TINY, **change})
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        llm.check_spec(spec)


def test_published_configuration_is_used_for_random_weights():
    config = llm.model_config("EleutherAI/pythia-410m-deduped")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 1024, 16)
    assert config.vocab_size == 50304 and config.max_position_embeddings == 2048
    assert config.rope_parameters["partial_rotary_factor"] == 0.25  # transformers 5 keeps rotary_pct here
    assert config.rope_parameters["rope_theta"] == 10000


def test_tiny_sweep_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "dev" / "llm"
    code = cli.main(["measure-llm", "--model", llm.TINY, "--dtype", "fp32,int8", "--batch", "1,2",
                     "--prompt-tokens", "6", "--new-tokens", "5", "--threads", "1", "--repeats", "2",
                     "--in-process", "--energy", "none", "--overhead-pairs", "1", "--out", str(out)])
    assert code == 0
    runs = llm_tables.load_llm_runs(tmp_path)
    assert len(runs) == 8 and (runs["status"] == "ok").all()
    assert (runs["new_tokens_generated"] == 5).all()  # the end token is masked: always the full length
    assert (runs["weights"] == "random").all()
    assert (runs["ttft_ms"] > 0).all() and (runs["decode_ms_per_token"] > 0).all()
    summary = llm_tables.summarize_llm(runs)
    assert len(summary) == 4 and (summary["runs_ok"] == 2).all()
    assert summary["energy_per_token_j"].isna().all()  # no source: no number
    assert cli.main(["select-llm", "--root", str(tmp_path), "--max-memory", "1e6"]) == 0
    assert "best:" in capsys.readouterr().out


def test_a_failed_run_is_recorded_and_its_repeats_skipped(tmp_path):
    specs = llm.expand([llm.TINY], ["fp32"], [1], [4], [3], [1], 2, energy="none", idle_s=0.0,
                       memory_headroom=1e-9)  # nothing fits in a billionth of the free memory
    rows = llm.run_llm_session(specs, tmp_path, "s", fresh_process=False, log=lambda line: None)
    assert rows["status"].tolist() == ["oom_predicted", "skipped"]
    assert math.isnan(rows["tokens_per_s"].iloc[0])


def test_weights_come_from_the_mirror_folder_when_it_has_them(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "llm" / "pythia-70m-deduped"
    tiny = AutoModelForCausalLM.from_config(llm.model_config(llm.TINY))
    tiny.save_pretrained(folder)  # a stand-in checkpoint in the mirror's layout
    monkeypatch.setenv("HEART_DATA_MIRROR", str(tmp_path))
    found, source, _ = llm.resolve_weights(llm.LlmSpec(model="pythia-70m-deduped"))
    assert (found, source) == (str(folder), "mirror")
    model, _, facts = llm.load_model(llm.LlmSpec(model="pythia-70m-deduped"), found)
    assert facts["weights"] == "pretrained" and model.config.num_hidden_layers == 2
    monkeypatch.setenv("HEART_DATA_MIRROR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub is skipped at once
    found, _, tried = llm.resolve_weights(llm.LlmSpec(model="pythia-70m-deduped"))
    assert found is None and any("unreachable" in t for t in tried)


def test_sweep_file_is_read_and_the_command_line_wins(tmp_path):
    import argparse

    from heart_lib.measure import llm_cli

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model: [pythia-70m-deduped, pythia-160m-deduped]\nbatch: [1, 4]\nrepeats: 3\n")
    parser = argparse.ArgumentParser()
    llm_cli.add_arguments(parser)
    options = llm_cli.sweep_options(parser.parse_args(["--sweep", str(sweep), "--batch", "8", "--threads", "1"]))
    assert options["model"] == ["pythia-70m-deduped", "pythia-160m-deduped"] and options["repeats"] == 3
    assert options["batch"] == [8] and options["threads"] == [1] and options["new_tokens"] == [64]
    sweep.write_text("batches: [1]\n")
    with pytest.raises(ValueError, match="unknown keys \\['batches'\\]"):
        llm_cli.sweep_options(parser.parse_args(["--sweep", str(sweep)]))
