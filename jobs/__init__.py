"""Command-line entries, one module per job: `bmray <job>` (jobs/cli.py) or
`python -m bmray.jobs.<job>`, the same command locally and under `ray job submit`."""
