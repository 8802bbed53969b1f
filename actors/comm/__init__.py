"""Collective communication: typed collectives, the shared-memory transport, the transport
interface the data-parallel strategies use (transport.py). See docs/communication.md."""
