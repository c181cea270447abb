"""Runtime: budgets, planners (policy) and, later, pools, the version table and transitions (mechanism)."""
