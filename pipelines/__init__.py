"""The jobs a user runs: `python -m pipelines <job>` (tokenize, train, eval, compare, info, bench)."""
