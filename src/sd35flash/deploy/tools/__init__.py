"""Deployment measurements: the memory planner and its checks, `sd35flash bench`, the GPU benchmarks."""
