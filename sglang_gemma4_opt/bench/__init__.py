"""Benchmarks of the plugin: kernels side by side in one process (`sglang-gemma4-opt bench`), the whole
model plugin on vs off in separate processes (`sglang-gemma4-opt bench-e2e`), and the README table
(`python -m sglang_gemma4_opt.bench.report`).

Modules import torch, triton and sglang lazily: the CLI imports `kernels` and `e2e` for every command.
"""
