"""Schedules, kernels, the bound and the oracle's mathematics: torch only, pure functions."""
