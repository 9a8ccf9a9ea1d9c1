"""The paper's method: set similarities (eq. 1-4), exact assignment solvers, negative mining and losses (eq. 5-8)."""
