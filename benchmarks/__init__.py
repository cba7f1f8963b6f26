"""deepopt benchmarks: run as modules (python -m benchmarks.<name>), never collected by pytest."""
