"""Causal language models on a device: load, prefill and decode timed apart, memory and energy.

The group's Jetson LLM utility (arXiv 2412.15352) runs Hugging Face `generate` once per fresh
process, 5 times, with jtop at 0.1 s and a 15 s idle period, and times model load and generation.
This module keeps that protocol and adds what it lacks: a sweep over batch size, prompt length,
new tokens and dtype; the generation split into prefill (time to first token) and decode
(per-token latency); energy above idle; and a measured harness overhead against a bare `generate`.

A run is described by an `LlmSpec` (JSON-serialisable: it crosses into the fresh process).
`measure_llm_one` measures it in this process and returns a row; `run_llm_session` runs a list of
specs, each in a new process (`python -m heart_lib.measure.llm SPEC RESULT`), and writes
`<out>/<session>.csv`, `<out>/<session>.meta.json` and `<out>/raw/<session>/<run_id>.json`.
Failed runs (out of memory, errors, crashes) are rows with a status, never dropped.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from heart_lib.measure import bench, energy, fingerprint
from heart_lib.measure.run import ROW_FINGERPRINT, _load_average, in_fresh_process, record_failure

OK = "ok"
_DEFAULT_INTERVAL_S = energy.DEFAULT_INTERVAL_S  # the spec field `energy` shadows the module in the class body

# Pythia (deduped) shapes: layers, hidden size, attention heads from EleutherAI's training configs
# (github.com/EleutherAI/pythia, models/<size>/pythia-<size>-deduped.yml: "num-layers",
# "hidden-size", "num-attention-heads"; all with rotary-pct 0.25, 2048 positions, untied output
# layer, GPT-J parallel residual). The MLP is 4 x hidden (GPT-NeoX's dense_h_to_4h) and the Hugging
# Face conversions pad the vocabulary to 50304 (huggingface.co/EleutherAI/pythia-70m-deduped config.json).
PYTHIA_SHAPES = {
    "pythia-70m-deduped": (6, 512, 8),
    "pythia-160m-deduped": (12, 768, 12),
    "pythia-410m-deduped": (24, 1024, 16),
    "pythia-1b-deduped": (16, 2048, 8),
    "pythia-1.4b-deduped": (24, 2048, 16),
}
PYTHIA_COMMON = {"vocab_size": 50304, "max_position_embeddings": 2048, "rotary_pct": 0.25,
                 "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "use_parallel_residual": True,
                 "tie_word_embeddings": False, "hidden_act": "gelu", "bos_token_id": 0, "eos_token_id": 0}
# Two layers, random weights: the whole protocol in seconds (tests, smoke profile).
TINY = "gpt-neox-tiny"
TINY_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
              "vocab_size": 512, "max_position_embeddings": 256}
MODELS = (*PYTHIA_SHAPES, TINY)

DTYPES = ("fp32", "bf16", "fp16", "int8", "4bit")
WEIGHTS = ("auto", "random", "hub", "mirror")  # or a local folder
PROMPT = ("The NVIDIA Jetson Orin is an embedded computer for robotics and edge AI. "
          "Large language models on such devices trade speed, memory and energy against quality. ")


@dataclass
class LlmSpec:
    """One run: a model at a dtype, batch size, prompt length and number of new tokens."""

    model: str
    batch_size: int = 1
    prompt_tokens: int = 32
    new_tokens: int = 64
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int = 1
    repeat: int = 0
    weights: str = "auto"
    warmup: int = 1  # untimed generations (a short one) before the timed ones
    generations: int = 1  # timed generations per run (the original: 1)
    overhead_pairs: int = 0  # > 0: also time this many bare `generate` calls against instrumented ones
    energy: str = "auto"
    interval_s: float = _DEFAULT_INTERVAL_S
    idle_s: float = 15.0
    seed: int = 0
    memory_headroom: float = 0.8
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # config overrides (e.g. num_hidden_layers)
    session: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # fingerprint facts from the command line

    @property
    def run_id(self) -> str:
        return (f"{self.model}__{self.dtype}__b{self.batch_size}__p{self.prompt_tokens}__n{self.new_tokens}"
                f"__t{self.threads}__r{self.repeat}")

    @property
    def config_key(self) -> tuple:
        return (self.model, self.dtype, self.batch_size, self.prompt_tokens, self.new_tokens, self.threads)


# ------------------------------------------------------------------ validation


def check_model_name(name: str) -> str:
    """A known model name; an `EleutherAI/` prefix is accepted and dropped."""
    short = str(name).removeprefix("EleutherAI/")
    if short not in MODELS:
        raise ValueError(f"model = {name!r}: unknown; allowed values are {list(MODELS)}")
    return short


def dtype_problem(dtype: str, device: str) -> str | None:
    """Why `dtype` cannot run on `device` here, or None when it can."""
    if dtype not in DTYPES:
        return f"dtype = {dtype!r}: allowed values are {list(DTYPES)}"
    on_cuda = device.startswith("cuda")
    if dtype == "fp16" and not on_cuda:
        return "dtype = 'fp16': CPU half-precision matmuls are emulated (slow, unrepresentative); use bf16 or a GPU"
    if dtype == "int8" and on_cuda:
        return "dtype = 'int8': dynamic int8 quantisation runs on the CPU only; on a GPU use 4bit (bitsandbytes)"
    if dtype == "4bit":
        if not on_cuda:
            return "dtype = '4bit': bitsandbytes 4-bit needs a CUDA device"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "dtype = '4bit': bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def check_spec(spec: LlmSpec) -> None:
    """Every user-given value of a spec; ValueError names the parameter, the value and what is allowed."""
    check_model_name(spec.model)
    for name in ("batch_size", "prompt_tokens", "new_tokens", "threads", "generations"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}: must be a positive integer")
    for name in ("warmup", "overhead_pairs"):
        if getattr(spec, name) < 0:
            raise ValueError(f"{name} = {getattr(spec, name)}: must be >= 0")
    problem = dtype_problem(spec.dtype, spec.device)
    if problem:
        raise ValueError(problem)
    if spec.weights not in WEIGHTS and not Path(spec.weights).expanduser().is_dir():
        raise ValueError(f"weights = {spec.weights!r}: allowed values are {list(WEIGHTS)} or an existing folder")
    context = model_config(spec.model, spec.model_kwargs).max_position_embeddings
    if spec.prompt_tokens + spec.new_tokens > context:
        raise ValueError(f"prompt_tokens + new_tokens = {spec.prompt_tokens} + {spec.new_tokens}: exceeds the "
                         f"context of {spec.model} ({context} tokens)")
    if spec.idle_s < 0 or not spec.interval_s > 0:
        raise ValueError(f"idle_s ({spec.idle_s}) must be >= 0 and interval_s ({spec.interval_s}) > 0")
    if not 0 < spec.memory_headroom <= 1:
        raise ValueError(f"memory_headroom = {spec.memory_headroom}: must be in (0, 1]")


# ------------------------------------------------------------------ models


def model_config(name: str, overrides: dict[str, Any] | None = None):
    """The published configuration of `name` as a `GPTNeoXConfig` (plus `overrides`)."""
    import heart_lib  # noqa: F401 - the torchvision shim runs before transformers imports torchvision
    from transformers import GPTNeoXConfig

    short = check_model_name(name)
    if short == TINY:
        values = {**PYTHIA_COMMON, **TINY_SHAPE}
    else:
        layers, hidden, heads = PYTHIA_SHAPES[short]
        values = {**PYTHIA_COMMON, "num_hidden_layers": layers, "hidden_size": hidden,
                  "num_attention_heads": heads, "intermediate_size": 4 * hidden}
    return GPTNeoXConfig(**{**values, **(overrides or {})})


def _hub_id(name: str) -> str:
    return f"EleutherAI/{name}"


def _hub_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether the hub (or the mirror named by HF_ENDPOINT) accepts a connection: checked first, because
    huggingface_hub retries an unreachable host for about a minute before giving up."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True, ""
    except OSError as err:
        return False, f"{url.hostname} unreachable ({type(err).__name__}: {err})"


def resolve_weights(spec: LlmSpec) -> tuple[str | None, str, list[str]]:
    """Where real weights are, as a local folder: (folder or None, 'mirror'/'hub'/'folder', what was tried).

    Order: an explicit folder; the mirror (`<mirror>/llm/<model>`); the hub (`EleutherAI/<model>`,
    downloaded into the Hugging Face cache; `HF_ENDPOINT` names a hub mirror). Not timed: the load
    phase of a run reads local files, as on a device that has the weights.
    """
    from heart_lib.paths import mirror_dir

    if spec.weights == "random" or spec.model == TINY:
        return None, "", ["random weights requested" if spec.weights == "random" else "test model: random weights"]
    if spec.weights not in WEIGHTS:
        return str(Path(spec.weights).expanduser()), "folder", []
    tried = []
    mirror = mirror_dir()
    if spec.weights in ("auto", "mirror"):
        folder = mirror / "llm" / spec.model if mirror is not None else None
        if folder is not None and (folder / "config.json").is_file():
            return str(folder), "mirror", tried
        tried.append(f"mirror: no {folder}/config.json" if folder else "mirror: none (HEART_DATA_MIRROR unset)")
    if spec.weights in ("auto", "hub"):
        reachable, why = _hub_reachable()
        if not reachable:
            tried.append(f"hub: {why}")
        else:
            try:
                from huggingface_hub import snapshot_download

                folder = snapshot_download(_hub_id(spec.model), allow_patterns=["*.json", "*.safetensors", "*.txt"])
                return folder, "hub", tried
            except Exception as err:  # noqa: BLE001 - recorded; the next step decides
                tried.append(f"hub {_hub_id(spec.model)}: {type(err).__name__}: {str(err)[:160]}")
    return None, "", tried


def load_model(spec: LlmSpec, folder: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode on the device, tokenizer or None, facts about the weights).

    Real weights from `folder` (see `resolve_weights`) when given; otherwise the model is built from
    its published configuration with random weights (`weights=random`): the timing of a dense
    transformer does not depend on the weight values, the text it writes does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "int8": torch.float32, "4bit": torch.float16}[spec.dtype]
    quant = {}
    if spec.dtype == "4bit":
        from transformers import BitsAndBytesConfig

        quant = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)}
    tokenizer = None
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **quant)
        label = "pretrained"
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - a tokenizer is optional: prompts can be token ids
            tokenizer = None
    else:
        label = "random"
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(model_config(spec.model, spec.model_kwargs), dtype=dtype)
        if spec.dtype == "4bit":
            model = _reload_quantised(model, quant)
    if spec.dtype == "int8":
        # torch 2.13 marks its quantised tensors deprecated (torchao is the successor) but this is still
        # the stock CPU int8 path; the warning would otherwise land on every page that measures int8.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated", category=UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if spec.dtype != "4bit":  # bitsandbytes places the model itself
        model = model.to(spec.device)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    return model, tokenizer, {"weights": label, "params_m": params / 1e6}


def _reload_quantised(model: Any, quant: dict[str, Any]) -> Any:
    """bitsandbytes quantises in `from_pretrained` only: save the random model and load it back."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="heart-llm-4bit-") as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, **quant)


def prompt_ids(spec: LlmSpec, vocab_size: int, tokenizer: Any = None):
    """A (batch, prompt_tokens) batch of token ids: the fixed prompt text when a tokenizer exists
    (repeated to length), else seeded random ids. Every row of the batch is the same prompt."""
    import torch

    if tokenizer is not None:
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][0]
        ids = ids.repeat(math.ceil(spec.prompt_tokens / len(ids)))[: spec.prompt_tokens]
    else:
        gen = torch.Generator().manual_seed(spec.seed)
        ids = torch.randint(0, vocab_size, (spec.prompt_tokens,), generator=gen)
    return ids.unsqueeze(0).repeat(spec.batch_size, 1).to(spec.device)


def predicted_memory_bytes(config: Any, batch: int, tokens: int, bytes_per_param: float) -> int:
    """Weights + KV cache + the last logits: what a generation needs at least (activations aside).

    The KV cache holds keys and values of every layer for every token: 2 x layers x batch x tokens x
    hidden values; logits are batch x vocab floats per step (float32 for the sampling step).
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    params = vocab * hidden * 2 + layers * (12 * hidden * hidden + 13 * hidden) + 2 * hidden
    kv = 2 * layers * batch * tokens * hidden * min(bytes_per_param, 4)
    return int(params * bytes_per_param + kv + batch * vocab * 4 * 2)


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 4, "4bit": 0.5}  # int8 is quantised after an fp32 build


# ------------------------------------------------------------------ timing (pure + clock)


class TokenClock:
    """A `generate` streamer that stamps the time of every `put`: first the prompt, then each new token.

    On a GPU it synchronises first, so a stamp is when the token exists, not when it was queued.
    `generate` already copies each token to the host for the streamer, so this adds no extra sync.
    """

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync, self.times = sync, []

    def put(self, value: Any) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def phase_timing(start: float, stamps: list[float], batch_size: int) -> dict[str, float]:
    """Prefill and decode figures of one generation from its token stamps (pure).

    `stamps` are the streamer's times: [prompt, token 1, token 2, ...]. Time to first token runs
    from the call to token 1 (the prefill forward and its first sampled token); decode is token 1 to
    the last token, one step per further token.
    """
    if len(stamps) < 2:
        raise ValueError(f"stamps: need the prompt and at least one token, got {len(stamps)}")
    if stamps[0] < start or any(b < a for a, b in zip(stamps, stamps[1:])):
        raise ValueError("stamps must not precede the start and must be non-decreasing")
    new_tokens = len(stamps) - 1
    steps = new_tokens - 1
    ttft = stamps[1] - start
    decode = stamps[-1] - stamps[1]
    total = stamps[-1] - start
    return {
        "new_tokens_generated": new_tokens,
        "generate_s": total,
        "ttft_ms": 1e3 * ttft,
        "decode_s": decode,
        "decode_ms_per_token": 1e3 * decode / steps if steps else math.nan,
        "decode_tokens_per_s": batch_size * steps / decode if steps and decode > 0 else math.nan,
        "tokens_per_s": batch_size * new_tokens / total if total > 0 else math.nan,
        "ms_per_token": 1e3 * total / new_tokens,
    }


def overhead_fraction(instrumented_s: Iterable[float], bare_s: Iterable[float]) -> float:
    """Median instrumented time over median bare time, minus 1 (pure): what the harness adds."""
    inst, bare = np.asarray(list(instrumented_s), float), np.asarray(list(bare_s), float)
    if inst.size == 0 or bare.size == 0:
        raise ValueError("overhead: need at least one instrumented and one bare timing")
    return float(np.median(inst) / np.median(bare) - 1.0)


def _generate_kwargs(new_tokens: int) -> dict[str, Any]:
    # Greedy, KV cache on, and always the full length: min_new_tokens masks the end token, so a
    # random-weight model (or a real one that would stop early) writes exactly `new_tokens`.
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True,
            "pad_token_id": 0, "eos_token_id": 0}


def generate_timed(model: Any, ids: Any, spec: LlmSpec, sync: Callable[[], None]) -> tuple[dict[str, float], list[float], float]:
    """One instrumented generation: (phase figures, token stamps, start time)."""
    import torch

    clock = TokenClock(sync)
    kwargs = _generate_kwargs(spec.new_tokens)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs)
        sync()
    figures = phase_timing(start, clock.times, spec.batch_size)
    if out.shape[1] - ids.shape[1] != spec.new_tokens:
        raise RuntimeError(f"generate wrote {out.shape[1] - ids.shape[1]} tokens, expected {spec.new_tokens}")
    return figures, clock.times, start


def generate_bare(model: Any, ids: Any, spec: LlmSpec, sync: Callable[[], None], new_tokens: int | None = None) -> float:
    """One plain `generate` call (no streamer), timed around the call only: the overhead reference."""
    import torch

    kwargs = _generate_kwargs(new_tokens or spec.new_tokens)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        sync()
    return time.perf_counter() - start


# ------------------------------------------------------------------ energy per phase


def phase_energy(trace: energy.Trace, phases: dict[str, tuple[float, float]], tokens: dict[str, int],
                 idle: tuple[float, float] | None, wrap_j: float | None) -> dict[str, Any]:
    """Energy total and above idle of each phase window, per token where tokens are given.

    Uses the ViT harness's `trace_energy` per window, so lost sources and uncovered windows are
    reported the same way (`energy_status`, from the generation window).
    """
    out: dict[str, Any] = {}
    for name, window in phases.items():
        if not window[1] > window[0]:
            continue
        figures = energy.trace_energy(trace, window, max(tokens.get(name, 1), 1), idle, wrap_j)
        prefix = "" if name == "generate" else f"{name}_"
        out[f"{prefix}energy_j"] = figures["energy_total_j"]
        out[f"{prefix}energy_above_idle_j"] = figures["energy_above_idle_j"]
        if name in tokens:
            out[f"{prefix}energy_per_token_j"] = figures["energy_per_image_j"]
            out[f"{prefix}energy_per_token_above_idle_j"] = figures["energy_per_image_above_idle_j"]
        if name == "generate":
            out.update(mean_power_w=figures["mean_power_w"], idle_power_w=figures["idle_power_w"],
                       energy_status=figures["energy_status"], energy_status_detail=figures["energy_status_detail"])
    out["peak_power_w"] = peak_power(trace, phases.get("generate"), wrap_j)
    return out


def peak_power(trace: energy.Trace, window: tuple[float, float] | None, wrap_j: float | None = None) -> float:
    """Highest sampled power inside `window` (for counters: highest mean power between readings)."""
    if window is None or len(trace.times) < 2:
        return math.nan
    times, values = np.asarray(trace.times), np.asarray(trace.values, dtype=float)
    if trace.kind == "energy":
        times, values = energy.counter_to_power(times, values, wrap_j)
    inside = (times >= window[0]) & (times <= window[1])
    return float(values[inside].max()) if inside.any() else math.nan


# ------------------------------------------------------------------ one run


def _blank_row(spec: LlmSpec) -> dict[str, Any]:
    return {"session": spec.session, "run_id": spec.run_id, "model": spec.model, "dtype": spec.dtype,
            "batch_size": spec.batch_size, "prompt_tokens": spec.prompt_tokens, "new_tokens": spec.new_tokens,
            "threads": spec.threads, "repeat": spec.repeat, "status": OK, "status_detail": "",
            "weights": "", "fresh_process": True,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def measure_llm_one(spec: LlmSpec, source: energy.EnergySource | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure one run in this process: (tidy row, raw detail). Failures are rows, not exceptions."""
    import torch

    row = _blank_row(spec)
    raw: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    opened = sampler = None
    try:
        check_spec(spec)
        bench.set_threads(spec.threads)
        precision = spec.dtype if spec.dtype in bench.PRECISIONS else "fp32"
        info = fingerprint.fingerprint(spec.device, precision, spec.threads, spec.overrides)
        row.update({k: info.get(k) for k in ROW_FINGERPRINT})
        row["transformers"] = _version("transformers")
        raw["fingerprint"] = info
        if source is None:
            source = opened = energy.open_source(spec.energy, spec.device, spec.interval_s)
        row.update(source.describe())
        config = model_config(spec.model, spec.model_kwargs)
        need = predicted_memory_bytes(config, spec.batch_size, spec.prompt_tokens + spec.new_tokens, _BYTES[spec.dtype])
        available = bench.available_memory_bytes(spec.device)
        row["predicted_memory_mb"] = need / 2**20
        if available is not None and need > spec.memory_headroom * available:
            row.update(status="oom_predicted", status_detail=(
                f"predicted {need / 2**30:.2f} GiB (weights + KV cache), {available / 2**30:.2f} GiB available"))
            return row, raw
        sync = bench.synchronizer(spec.device)
        if not isinstance(source, energy.NoEnergySource):
            sampler = energy.PowerSampler(source, spec.interval_s).start()
        idle = None
        if sampler is not None and spec.idle_s > 0:
            i0 = time.perf_counter()
            time.sleep(spec.idle_s)
            idle = (i0, time.perf_counter())
        row["load_avg_1m_start"] = _load_average()
        # Import the model code before the clock starts: load time is building or reading weights.
        import transformers.models.gpt_neox.modeling_gpt_neox  # noqa: F401

        folder, found_in, tried = resolve_weights(spec)
        if folder is None and spec.weights not in ("auto", "random") and spec.model != TINY:
            raise ValueError(f"weights = {spec.weights!r}: not found ({'; '.join(tried)})")
        row.update(weights_source=found_in or "config", weights_detail="; ".join(tried))
        bench.reset_peak_memory(spec.device)
        l0 = time.perf_counter()
        model, tokenizer, facts = load_model(spec, folder)
        sync()
        l1 = time.perf_counter()
        row.update(facts, load_s=l1 - l0, load_peak_memory_mb=_peak_mb(spec.device))
        ids = prompt_ids(spec, model.config.vocab_size, tokenizer)
        for _ in range(spec.warmup):
            generate_bare(model, ids, spec, sync, new_tokens=min(4, spec.new_tokens))
        kind = bench.reset_peak_memory(spec.device)
        cpu0 = time.process_time()
        runs = [generate_timed(model, ids, spec, sync) for _ in range(spec.generations)]
        cpu_s = time.process_time() - cpu0
        row["load_avg_1m_end"] = _load_average()
        row.update(peak_memory_mb=_peak_mb(spec.device), peak_memory_kind=kind)
        if spec.device.startswith("cuda"):
            row["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated(spec.device) / 2**20
        figures = [f for f, _, _ in runs]
        median = figures[int(np.argsort([f["generate_s"] for f in figures])[len(figures) // 2])]
        row.update(median, generations=len(runs))
        gen_window = (runs[0][2], runs[-1][1][-1])
        row["cpu_share"] = cpu_s / ((gen_window[1] - gen_window[0]) * spec.threads)
        raw["stamps"] = [[t - s for t in stamps] for _, stamps, s in runs]
        if spec.overhead_pairs:
            inst, bare = [], []
            for _ in range(spec.overhead_pairs):  # alternated, so drifts hit both alike
                bare.append(generate_bare(model, ids, spec, sync))
                inst.append(generate_timed(model, ids, spec, sync)[0]["generate_s"])
            row.update(overhead_frac=overhead_fraction(inst, bare), overhead_pairs=spec.overhead_pairs,
                       bare_generate_s=float(np.median(bare)), instrumented_generate_s=float(np.median(inst)))
            raw["overhead"] = {"instrumented_s": inst, "bare_s": bare}
        trace = sampler.stop() if sampler is not None else None
        sampler = None
        row["idle_s"] = idle[1] - idle[0] if idle else 0.0
        if trace is not None:
            first_stamps = runs[0][1]
            tokens = spec.batch_size * spec.new_tokens * len(runs)
            phases = {"generate": gen_window, "load": (l0, l1), "prefill": (runs[0][2], first_stamps[1]),
                      "decode": (first_stamps[1], first_stamps[-1])}
            counts = {"generate": tokens, "prefill": spec.batch_size,
                      "decode": spec.batch_size * (spec.new_tokens - 1)}
            row.update(phase_energy(trace, phases, counts, idle, source.wrap_j))
            row.update(n_samples=len(trace.times), sample_interval_s=trace.effective_interval_s())
            origin = gen_window[0]
            raw["trace"] = {"kind": trace.kind, "t": [t - origin for t in trace.times], "value": trace.values}
        else:
            row.update(energy_status="none", energy_status_detail="")
    except Exception as err:  # noqa: BLE001 - a failed configuration is reported and the session goes on
        record_failure(row, raw, err)
    finally:
        if sampler is not None:
            sampler.stop()
        if opened is not None:
            opened.close()
    return row, raw


def _peak_mb(device: str) -> float:
    peak = bench.peak_memory_bytes(device)
    return peak / 2**20 if peak is not None else math.nan


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------ fresh processes and sessions


def run_llm_in_fresh_process(spec: LlmSpec, timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`measure_llm_one` in a new Python process; a crash (e.g. the OOM killer) becomes a row."""
    return in_fresh_process("heart_lib.measure.llm", spec, _blank_row(spec), timeout_s)


COLUMN_ORDER = ("session", "run_id", "device_name", "device", "model", "weights", "dtype", "batch_size",
                "prompt_tokens", "new_tokens", "threads", "repeat", "status", "status_detail", "load_s",
                "ttft_ms", "decode_ms_per_token", "decode_tokens_per_s", "tokens_per_s", "ms_per_token",
                "generate_s", "new_tokens_generated", "peak_memory_mb", "gpu_peak_memory_mb", "load_peak_memory_mb",
                "energy_source", "energy_status", "energy_j", "energy_per_token_j", "energy_per_token_above_idle_j",
                "prefill_energy_j", "decode_energy_per_token_j", "load_energy_j", "peak_power_w", "mean_power_w",
                "idle_power_w", "idle_s", "overhead_frac", "cpu_share", "params_m")


def tidy(rows: list[dict[str, Any]]):
    """Rows as a table with every COLUMN_ORDER column (NaN when not measured), others after."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for col in COLUMN_ORDER:
        if col not in frame.columns:
            frame[col] = math.nan
    return frame[list(COLUMN_ORDER) + sorted(c for c in frame.columns if c not in COLUMN_ORDER)]


def expand(models: list[str], dtypes: list[str], batches: list[int], prompts: list[int], new_tokens: list[int],
           threads: list[int], repeats: int, **common: Any) -> list[LlmSpec]:
    """The run list: every combination, repeats consecutive; each spec validated before anything runs."""
    if repeats < 1:
        raise ValueError(f"repeats = {repeats}: must be a positive integer")
    specs = [LlmSpec(model=check_model_name(m), dtype=d, batch_size=b, prompt_tokens=p, new_tokens=n, threads=t,
                     repeat=r, **common)
             for m in models for d in dtypes for b in batches for p in prompts for n in new_tokens for t in threads
             for r in range(repeats)]
    for spec in specs[::repeats]:
        check_spec(spec)
    return specs


def run_llm_session(specs: Iterable[LlmSpec], out: str | Path, session: str, fresh_process: bool = True,
                    log: Callable[[str], None] = print, timeout_s: float | None = None,
                    facts: dict[str, Any] | None = None):
    """Measure every spec; a configuration whose first run fails has its other repeats recorded as
    ``skipped``. The table is rewritten after every run, so an interrupted session keeps what it has."""
    from heart_lib import results

    out = Path(out)
    rows: list[dict[str, Any]] = []
    failed: dict[tuple, str] = {}
    for spec in specs:
        spec = dataclasses.replace(spec, session=session)
        start = time.perf_counter()
        if spec.config_key in failed:
            row, raw = _blank_row(spec), {}
            row.update(status="skipped", status_detail=f"run 0 of this configuration failed: {failed[spec.config_key]}")
        else:
            row, raw = run_llm_in_fresh_process(spec, timeout_s) if fresh_process else measure_llm_one(spec)
        row["fresh_process"] = fresh_process
        for name in ROW_FINGERPRINT:
            if row.get(name) is None and facts and facts.get(name) is not None:
                row[name] = facts[name]
        rows.append(row)
        if raw:
            results.write_json(out / "raw" / session / f"{spec.run_id}.json", {"row": row, **raw})
        results.write_table(out / f"{session}.csv", tidy(rows))
        if row["status"] not in (OK, "skipped") and spec.repeat == 0:
            failed[spec.config_key] = f"{row['status']}: {str(row['status_detail'])[:200]}"
        log(_progress_line(row, time.perf_counter() - start))
    return tidy(rows)


def _progress_line(row: dict[str, Any], wall: float) -> str:
    head = (f"{row['model']} {row['dtype']} b={row['batch_size']} p={row['prompt_tokens']} n={row['new_tokens']} "
            f"run {row['repeat']}")
    if row["status"] != OK:
        return f"{head}: {row['status']} - {str(row['status_detail'])[:160]} ({wall:.0f} s)"
    nan = math.nan
    text = (f"{head}: load {row.get('load_s', nan):.2f} s, TTFT {row.get('ttft_ms', nan):.1f} ms, "
            f"decode {row.get('decode_ms_per_token', nan):.1f} ms/token, {row.get('tokens_per_s', nan):.1f} tokens/s, "
            f"peak {row.get('peak_memory_mb', nan):.0f} MiB [{row.get('weights')}]")
    if row.get("energy_status") == OK:
        text += f", {row['energy_per_token_j']:.3f} J/token ({row['energy_per_token_above_idle_j']:.3f} above idle)"
    return text + f" ({wall:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    """Worker entry: `python -m heart_lib.measure.llm SPEC.json RESULT.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m heart_lib.measure.llm SPEC.json RESULT.json", file=sys.stderr)
        return 2
    import heart_lib  # noqa: F401 - torchvision shim before transformers
    from heart_lib import results

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = LlmSpec(**json.loads(Path(argv[0]).read_text()))
    row, raw = measure_llm_one(spec)
    results.write_json(argv[1], {"row": row, "raw": raw})
    return 0


if __name__ == "__main__":
    sys.exit(main())
