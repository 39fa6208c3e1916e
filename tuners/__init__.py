"""Tuners: one module per kind of setting (plan, apply, verify, restore)."""
