"""Benchmarks of the fused ops (kernels/): one `run(device, quick)` per op, for `uniloom bench kernels`."""
