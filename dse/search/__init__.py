"""The search over per-layer assignments: space, driver (stages A and B), trial storage, sensitivity and Pareto fronts."""
