"""Measuring a model: its layer inventory, non-primitive ops, eager overhead, the profiler and the profile store."""
