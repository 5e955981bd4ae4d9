"""Small helpers used across layers: statistics, files."""
