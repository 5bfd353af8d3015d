"""Latency, throughput, memory and energy of (pruned) ViTs on a device.

Modules: `bench` (timing discipline, peak memory), `energy` (power sources, sampler, integration),
`fingerprint` (what the numbers depend on), `workload` (model + pruning + FLOPs), `run` (one run,
fresh-process sessions), `tables` (loading and summarising results), `cli` (the command line).
"""
