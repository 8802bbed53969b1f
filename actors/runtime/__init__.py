"""What a Ray actor of a gang runs: the gang worker, its context, the per-rank entry."""
