"""Pallas kernels for jsparse: arrays in, arrays out; no autodiff, no formats."""
