"""Collective communication: typed collectives, the shared-memory transport, point-to-point."""
