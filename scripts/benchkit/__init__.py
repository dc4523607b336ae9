"""The throughput benchmark's parts: inputs, variants (a registry), measuring, report.
`scripts/bench.py` runs them; see its docstring."""
