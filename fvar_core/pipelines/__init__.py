"""End-to-end runs that chain the stages: quickstart, the ablation experiment, the alias audit, benchmarks."""
