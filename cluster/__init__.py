"""Driver side: connect to Ray, worker gangs, the launcher, a local head, the planner and its
cost model."""
from bmray.cluster.connect import connect, shutdown

__all__ = ["connect", "shutdown"]
