"""The cost model: per-call and whole-model latency/energy from a profile, its regression laws, cost sources and validation."""
