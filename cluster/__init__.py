"""Driver side: connect to Ray, and (later issues) the mesh, placement groups and worker gangs."""
from bmray.cluster.connect import connect, shutdown

__all__ = ["connect", "shutdown"]
