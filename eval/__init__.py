"""How well: lm-eval-harness model and shipped tasks, accuracy sweeps, throughput/memory benchmarks."""
