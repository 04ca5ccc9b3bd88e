"""DiT feature-cache evaluation: a small class-conditional DiT trained on scikit-learn's digits, metrics."""
