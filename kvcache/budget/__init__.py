"""Layer budgets (kind ``budget``). Importing this package registers the built-in policies."""

from kvcache.budget import cake, pyramid, uniform  # noqa: F401  (registration)
from kvcache.budget.base import LayerBudget, check_budget, check_budgets, parse_budget, tokens_for

__all__ = ["LayerBudget", "check_budget", "check_budgets", "parse_budget", "tokens_for"]
