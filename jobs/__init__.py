"""User entrypoints: `python -m jobs.<name>`, the same command locally and under `ray job submit`."""
