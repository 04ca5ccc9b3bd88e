"""How to attend over what a policy kept: reference (HF eager math), SDPA, and the scoring primitives."""
