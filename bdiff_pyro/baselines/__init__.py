"""Density models to compare a diffusion model with, fitted on the same splits."""
