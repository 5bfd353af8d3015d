"""Energy maths on synthetic traces with known integrals, Jetson parsers on fixtures, sources, sampler."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from heart_lib.measure import energy

FIXTURES = Path(__file__).parent / "fixtures" / "measure"


# ------------------------------------------------------------------ integration maths


def test_constant_power_integrates_to_power_times_duration():
    t = np.linspace(0.0, 10.0, 101)
    assert energy.integrate_power(t, np.full_like(t, 7.5)) == pytest.approx(75.0, rel=1e-12)


def test_linear_power_is_exact_on_any_window_and_uneven_sampling():
    rng = np.random.default_rng(0)
    t = np.sort(np.concatenate(([0.0, 10.0], rng.uniform(0, 10, 37))))
    p = 4.0 + 1.5 * t  # trapezoids are exact for linear power, edges included (interpolated)
    t0, t1 = 1.234, 8.765
    exact = 4.0 * (t1 - t0) + 0.75 * (t1**2 - t0**2)
    assert energy.integrate_power(t, p, t0, t1) == pytest.approx(exact, rel=1e-12)


def test_sine_power_converges_to_the_analytic_integral():
    t = np.linspace(0.0, 2.0, 2001)
    p = 10 + 3 * np.sin(2 * np.pi * t)  # two full periods: the sine integrates to zero
    assert energy.integrate_power(t, p) == pytest.approx(20.0, abs=1e-4)
    coarse = np.linspace(0.0, 2.0, 21)  # 100 ms sampling of the same signal is still within 0.1 %
    assert energy.integrate_power(coarse, 10 + 3 * np.sin(2 * np.pi * coarse)) == pytest.approx(20.0, rel=1e-3)


def test_window_outside_the_trace_or_bad_traces_are_rejected():
    t = np.array([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="not covered"):
        energy.integrate_power(t, [1, 1, 1], -0.5, 1.0)
    with pytest.raises(ValueError, match="empty"):
        energy.integrate_power(t, [1, 1, 1], 1.0, 1.0)
    with pytest.raises(ValueError, match="increasing"):
        energy.integrate_power([0.0, 2.0, 1.0], [1, 1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        energy.integrate_power([0.0], [1.0])


def test_counter_energy_interpolates_and_unwraps():
    t = np.arange(0.0, 5.01, 0.5)
    joules = 3.0 * t  # 3 W
    assert energy.counter_energy(t, joules, 0.25, 4.75) == pytest.approx(13.5, rel=1e-12)
    wrapped = np.mod(100.0 + joules, 105.0)  # the counter wraps past 105 J
    assert energy.counter_energy(t, wrapped, 0.0, 5.0, wrap_j=105.0) == pytest.approx(15.0, rel=1e-12)
    with pytest.raises(ValueError, match="wrap"):
        energy.counter_energy(t, wrapped)
    mid, watts = energy.counter_to_power(t, joules)
    assert np.allclose(watts, 3.0) and mid[0] == pytest.approx(0.25)


def test_energy_report_total_above_idle_and_per_image():
    t = np.linspace(0.0, 20.0, 201)
    p = np.where(t < 10.0, 5.0, 12.0)  # idle 5 W for 10 s, then 12 W
    report = energy.energy_report(t, p, "power", run=(11.0, 19.0), images=40, idle=(1.0, 9.0))
    assert report["energy_total_j"] == pytest.approx(96.0)
    assert report["idle_power_w"] == pytest.approx(5.0)
    assert report["energy_above_idle_j"] == pytest.approx(56.0)
    assert report["energy_per_image_j"] == pytest.approx(2.4)
    assert report["energy_per_image_above_idle_j"] == pytest.approx(1.4)
    assert report["mean_power_w"] == pytest.approx(12.0)
    counter = energy.energy_report(t, np.cumsum(np.r_[0, np.diff(t) * p[1:]]), "energy", (11.0, 19.0), 40, (1.0, 9.0))
    assert counter["energy_total_j"] == pytest.approx(96.0) and counter["idle_power_w"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="images"):
        energy.energy_report(t, p, "power", (11.0, 19.0), 0)


# ------------------------------------------------------------------ Jetson formats


def test_tegrastats_line_parses_rails_with_and_without_units():
    line = (FIXTURES / "tegrastats_orin_nano_jp5.log").read_text().splitlines()[1]
    rails = energy.parse_tegrastats_line(line)
    assert rails == {"VDD_IN": (6000, 5000), "VDD_CPU_GPU_CV": (1200, 841), "VDD_SOC": (1600, 1525)}
    old = energy.parse_tegrastats_line((FIXTURES / "tegrastats_nano_jp4.log").read_text().splitlines()[0])
    assert old == {"POM_5V_IN": (2196, 2196), "POM_5V_GPU": (40, 40), "POM_5V_CPU": (484, 484)}
    assert "RAM" not in old and "SWAP" not in old and "IRAM" not in old  # memory fields are not rails


@pytest.mark.parametrize("name, watts, rule", [
    ("tegrastats_orin_nano_jp5.log", [4.0, 6.0, 8.0, 8.0, 4.0], "VDD_IN"),
    ("tegrastats_nano_jp4.log", [2.196, 5.204], "POM_5V_IN"),
    ("tegrastats_agx_orin_jp5.log", [8.5, 23.0], "sum(VDDQ_VDD2_1V8AO+VDD_CPU_CV+VDD_GPU_SOC+VIN_SYS_5V0)"),
])
def test_tegrastats_log_gives_the_module_power_trace(name, watts, rule):
    trace = energy.parse_tegrastats_log(FIXTURES / name, interval_s=0.1)
    assert np.allclose(trace["watts"], watts)
    assert np.allclose(trace["times"], 0.1 * np.arange(len(watts)))
    assert trace["rule"] == rule and trace["skipped_lines"] == 0


def test_tegrastats_log_energy_matches_hand_integral():
    trace = energy.parse_tegrastats_log(FIXTURES / "tegrastats_orin_nano_jp5.log", interval_s=0.1)
    # trapezoids of 4,6,8,8,4 W at 0.1 s: 0.1*(5+7+8+6) = 2.6 J
    assert energy.integrate_power(trace["times"], trace["watts"]) == pytest.approx(2.6)


def test_jtop_power_dicts_give_total_watts():
    nano = json.loads((FIXTURES / "jtop_power_orin_nano.json").read_text())
    assert [energy.jtop_total_watts(p) for p in nano] == [4.0, 8.0]
    agx = json.loads((FIXTURES / "jtop_power_agx_orin.json").read_text())[0]
    assert energy.jtop_total_watts(agx) == pytest.approx(8.0)
    assert sum(r["power"] for r in agx["rail"].values()) == agx["tot"]["power"]  # the fixture follows jtop's rule
    with pytest.raises(ValueError, match="tot"):
        energy.jtop_total_watts({"rail": {}})


class FakeJtop:
    """A jtop client replaying the fixture's snapshots (jtop's `.power`, `.ok()`, `.close()`)."""

    def __init__(self, snapshots, fail_after=None):
        self.snapshots, self.calls, self.fail_after, self.interval = snapshots, 0, fail_after, 0.1

    def is_alive(self):  # jtop's client is a Thread
        return self.fail_after is None or self.calls < self.fail_after

    @property
    def power(self):
        snap = self.snapshots[min(self.calls, len(self.snapshots) - 1)]
        self.calls += 1
        return snap

    def close(self):
        pass


def test_jtop_source_reads_and_marks_a_stopped_service():
    snaps = json.loads((FIXTURES / "jtop_power_orin_nano.json").read_text())
    source = energy.JtopSource(client=FakeJtop(snaps, fail_after=2))
    assert source.read() == pytest.approx(8.0)  # the constructor consumed the first snapshot
    with pytest.raises(energy.SourceUnavailable, match="lost the jtop service"):
        source.read()
    assert source.describe()["energy_source"] == "jtop" and "VDD_IN" in source.describe()["energy_reason"]


def test_live_tegrastats_source_follows_a_process(tmp_path):
    log = FIXTURES / "tegrastats_orin_nano_jp5.log"
    script = f"import time\nfor line in open({str(log)!r}):\n    print(line, end='', flush=True); time.sleep(0.05)\n"
    source = energy.TegrastatsSource(command=[sys.executable, "-c", script])
    try:
        seen = {source.read()}
        deadline = time.time() + 5
        while time.time() < deadline and len(seen) < 3:
            seen.add(source.read())
            time.sleep(0.01)
        assert seen <= {4.0, 6.0, 8.0} and len(seen) >= 2
        time.sleep(0.5)  # the fake tegrastats has exited: the source must say so, not repeat its last value
        with pytest.raises(energy.SourceUnavailable, match="exited"):
            source.read()
    finally:
        source.close()


# ------------------------------------------------------------------ sources


def _fake_powercap(root: Path, uj: int, max_uj: int = 262143328850) -> Path:
    zone = root / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_source_reads_sysfs_and_unwraps(tmp_path):
    zone = _fake_powercap(tmp_path, 999_000_000, max_uj=1_000_000_000)
    source = energy.RaplSource(str(tmp_path))
    first = source.read()
    (zone / "energy_uj").write_text("4000000\n")  # wrapped: 1000 J range, +5 J
    assert source.read() - first == pytest.approx(5.0)
    assert "package-0" in source.describe()["energy_reason"]


def test_rapl_unavailable_reasons_are_explicit(tmp_path):
    with pytest.raises(energy.SourceUnavailable, match="does not exist"):
        energy.RaplSource(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(energy.SourceUnavailable, match="no intel-rapl"):
        energy.RaplSource(str(tmp_path / "empty"))


def test_auto_without_any_source_says_why_and_named_sources_raise():
    chosen = energy.open_source("auto", "cpu")
    if isinstance(chosen, energy.NoEnergySource):  # this machine (a VM): the reasons of every candidate
        reason = chosen.describe()["energy_reason"]
        assert reason.startswith("no energy source") and "RAPL" in reason and "jtop" in reason
        with pytest.raises(energy.SourceUnavailable):
            chosen.read()
    else:
        chosen.close()
    assert isinstance(energy.open_source("none"), energy.NoEnergySource)
    with pytest.raises(ValueError, match="allowed"):
        energy.open_source("wattmeter")


def test_named_nvml_source_on_a_machine_without_nvidia_gpu_raises():
    try:
        source = energy.NvmlSource(0)
    except energy.SourceUnavailable as err:
        assert str(err).startswith("NVML")
    else:  # an NVIDIA machine: the counter must be monotonic
        a = source.read()
        time.sleep(0.2)
        assert source.read() >= a
        source.close()


# ------------------------------------------------------------------ sampler


def test_sampler_integrates_a_synthetic_linear_power_exactly():
    start = time.perf_counter()
    source = energy.CallableSource(lambda: 5.0 + 2.0 * (time.perf_counter() - start), "power", "synthetic")
    with energy.PowerSampler(source, interval_s=0.02) as sampler:
        time.sleep(0.5)
    trace = sampler.trace
    assert len(trace.times) >= 10 and trace.lost_at is None
    a, b = trace.times[1] + 0.003, trace.times[-2] - 0.003
    # each reading is taken at (almost) its timestamp; allow for the few microseconds between them
    exact = 5.0 * (b - a) + ((b - start) ** 2 - (a - start) ** 2)
    assert energy.integrate_power(trace.times, trace.values, a, b) == pytest.approx(exact, rel=1e-3)


def test_sampler_with_a_counter_source_recovers_the_power():
    start = time.perf_counter()
    source = energy.CallableSource(lambda: 3.0 * (time.perf_counter() - start), "energy", "counter")
    with energy.PowerSampler(source, interval_s=0.02) as sampler:
        time.sleep(0.3)
    t = sampler.trace.times
    got = energy.counter_energy(t, sampler.trace.values, t[0], t[-1])
    assert got == pytest.approx(3.0 * (t[-1] - t[0]), rel=1e-3)


def test_sampler_overhead_is_under_one_percent(tmp_path):
    _fake_powercap(tmp_path, 1_000_000)
    source = energy.RaplSource(str(tmp_path))  # a real sysfs-style read per sample
    with energy.PowerSampler(source, interval_s=energy.DEFAULT_INTERVAL_S) as sampler:
        deadline = time.perf_counter() + 2.0
        x = 0
        while time.perf_counter() < deadline:  # the main thread busy, as during inference
            x += 1
    trace = sampler.trace
    assert len(trace.times) >= 15
    assert trace.overhead_frac < 0.01, f"sampler used {100 * trace.overhead_frac:.2f} % of the run"


def test_source_disappearing_mid_run_marks_the_trace_and_the_energy():
    start = time.perf_counter()

    def read():
        if time.perf_counter() - start > 0.25:
            raise OSError(19, "No such device")
        return 6.0

    with energy.PowerSampler(energy.CallableSource(read), interval_s=0.02) as sampler:
        time.sleep(0.5)
    trace = sampler.trace
    assert trace.lost_at is not None and "No such device" in trace.lost_reason
    result = energy.trace_energy(trace, (start + 0.1, start + 0.45), images=4, idle=None)
    assert result["energy_status"] == "lost" and math.isnan(result["energy_total_j"])
    assert "No such device" in result["energy_status_detail"]
    # a window that ended before the loss is still valid
    early = energy.trace_energy(trace, (trace.times[1], trace.times[-1]), images=4, idle=None)
    assert early["energy_status"] == "ok" and early["mean_power_w"] == pytest.approx(6.0)


def test_effective_interval_reveals_a_slow_service():
    trace = energy.Trace(kind="power", times=list(np.arange(0, 3, 0.1)),
                         values=[float(v) for v in np.repeat(np.arange(6), 5)])  # value changes every 0.5 s
    assert trace.effective_interval_s() == pytest.approx(0.5)
