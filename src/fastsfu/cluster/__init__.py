"""Coordination of `fastsfu serve --workers N` over NATS (docs/cluster.md): the bus, the registry of
nodes and room homes, and placement. Nothing here touches packets."""
