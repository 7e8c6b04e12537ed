"""The scheduler's model, no mlx: profiles, chip profiles, power, costs, tiers, residency, the plan."""
