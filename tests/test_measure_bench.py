"""Timing discipline, memory checks, device validation and the fingerprint."""

from __future__ import annotations

import math

import pytest
import torch

import heart_lib  # noqa: F401 - before timm
from heart_lib.measure import bench, fingerprint, workload

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}


@pytest.fixture(scope="module")
def tiny():
    return workload.build("vit_tiny_patch16_224", "none", model_kwargs=TINY)


def test_timing_respects_min_iters_min_time_and_reports_spread(tiny):
    bench.set_threads(1)
    x = bench.make_input(2, tiny.image_size, "cpu", "fp32")
    timing = bench.time_forward(tiny.model, x, bench.TimingSettings(warmup_iters=1, min_iters=4, min_time_s=0.3), "cpu")
    summary = timing.summary(batch_size=2)
    assert summary["iters"] >= 4 and summary["timed_s"] >= 0.3
    assert summary["latency_min_ms"] <= summary["latency_p25_ms"] <= summary["latency_median_ms"] \
        <= summary["latency_p75_ms"] <= summary["latency_max_ms"]
    assert summary["throughput_img_s"] == pytest.approx(2 / (summary["latency_median_ms"] / 1e3))
    assert summary["latency_per_image_ms"] == pytest.approx(summary["latency_median_ms"] / 2)
    assert summary["peak_memory_mb"] > 0 and summary["peak_memory_kind"] in ("rss_peak", "process_peak_rss")
    assert 0 < summary["cpu_share"] <= 1.5
    assert torch.get_num_threads() == 1


def test_timing_refuses_a_model_in_training_mode(tiny):
    tiny.model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            bench.time_forward(tiny.model, bench.make_input(1, 32, "cpu", "fp32"), bench.TimingSettings(), "cpu")
    finally:
        tiny.model.eval()


@pytest.mark.parametrize("field, value", [("warmup_iters", -1), ("min_iters", 0), ("min_time_s", -1.0)])
def test_bad_timing_settings_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        bench.TimingSettings(**{field: value}).check()


def test_a_batch_that_cannot_fit_is_predicted(tiny):
    fits, detail = bench.predict_fits(tiny.model, 10**9, tiny.image_size, "cpu", "fp32")
    assert not fits and "GiB available" in detail
    fits_small, _ = bench.predict_fits(tiny.model, 2, tiny.image_size, "cpu", "fp32")
    assert fits_small


def test_out_of_memory_errors_are_recognised():
    assert bench.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert bench.is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                               "can't allocate memory: you tried to allocate 10 bytes"))
    assert bench.is_out_of_memory(MemoryError())
    assert not bench.is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", "", "cpu0"])
def test_unknown_devices_are_rejected_with_the_allowed_list(bad):
    with pytest.raises(ValueError, match="allowed values"):
        fingerprint.resolve_device(bad)


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA device"):
        fingerprint.resolve_device("cuda")
    assert fingerprint.resolve_device("auto") == "cpu"


def test_fingerprint_has_the_fields_results_are_stamped_with():
    info = fingerprint.fingerprint("cpu", "fp32", 2, {"notes": "test"})
    for key in ("cpu_model", "cpu_logical", "threads", "torch", "timm", "precision", "gpu_name", "jetpack",
                "l4t", "nvpmodel", "jetson_clocks", "device_name"):
        assert key in info
    assert info["threads"] == 2 and info["precision"] == "fp32" and info["notes"] == "test"
    assert info["device_name"].endswith("2t") or info["device_name"].endswith("2t-vm")


def test_device_slug_prefers_board_then_gpu_then_cpu():
    assert fingerprint.device_slug({"jetson_model": "NVIDIA Jetson AGX Orin Developer Kit"}) == "jetson-agx-orin-developer-kit"
    assert fingerprint.device_slug({"gpu_name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert fingerprint.device_slug({"cpu_model": "AMD EPYC", "threads": 2, "cpu_hypervisor": True}) == "amd-epyc-2t-vm"


def test_flops_are_counted_and_the_source_recorded(tiny):
    flops = workload.flops_per_image(tiny)
    assert flops["flops_per_image"] > 0 and flops["flops_source"]
    # analytic and FlopCounterMode counts agree for a dense model (same convention, attention included)
    assert flops["flops_counted"] == pytest.approx(flops["flops_per_image"], rel=0.01)


def test_pruning_text_is_canonicalised_and_bad_configs_rejected():
    assert workload.canonical_pruning("none") == "none" and workload.canonical_pruning(None) == "none"
    text = workload.canonical_pruning("tokens=0.7@1;selector=cls_attention")
    assert text == workload.canonical_pruning(text)
    with pytest.raises(ValueError):
        workload.canonical_pruning("tokens=1.7@1")


def test_every_selector_of_the_pruning_chapter_can_be_timed():
    """The learned gate (untrained, same shape, said so) and the HEART oracle (scoring inside each
    timed forward, so autograd must stay on) time like any other configuration; the oracle's
    end-to-end forward costs more than the same pruning with a free selector."""
    bench.set_threads(1)
    settings = bench.TimingSettings(warmup_iters=1, min_iters=2, min_time_s=0.0)
    medians = {}
    for selector in ("gate", "heart", "cls_attention"):
        gate = ";gate=no-such-file" if selector == "gate" else ""  # as in the sweep: a name, not a trained file
        work = workload.build("vit_tiny_patch16_224", f"tokens=0.5@1;selector={selector}{gate}", model_kwargs=TINY)
        assert work.autograd == (selector == "heart")
        assert ("untrained token gate" in work.notes) == (selector == "gate")
        x = bench.make_input(2, work.image_size, "cpu", "fp32")
        timing = bench.time_forward(work.model, x, settings, "cpu", autograd=work.autograd)
        medians[selector] = float(timing.summary(2)["latency_median_ms"])
        assert work.model.record.counts[-1][-1][1] < 17  # physically fewer tokens than 16 patches + class
    assert medians["heart"] > medians["cls_attention"]
    with pytest.raises(RuntimeError):  # why autograd=True is needed: inference mode breaks the oracle
        work = workload.build("vit_tiny_patch16_224", "tokens=0.5@1;selector=heart", model_kwargs=TINY)
        bench.time_forward(work.model, bench.make_input(1, work.image_size, "cpu", "fp32"), settings, "cpu")
