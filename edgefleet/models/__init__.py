"""Operator tooling for models: build, dataset, quantize, evaluate."""
