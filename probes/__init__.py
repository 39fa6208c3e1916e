"""Probes: read-only sources of readings, one module per source."""
