"""Deterministic synthetic world: entities and facts, encyclopedia pages, QA, retrieval, labels.

    from bmray.models.world import World, WorldConfig, write_world
    world = World(WorldConfig(seed=0, n_entities=200))
    for doc in world.iter_documents(): ...
    write_world(WorldConfig(size_bytes=10**9), "/data/world", formats=("jsonl", "parquet"))

Modules: `config` (WorldConfig), `names` (unique invented names), `schema` (types, attributes,
templates: data only), `world` (World: lazy generation), `writer` (write_world: files on disk).

Design and references: docs/models.md, "The synthetic world".
"""
from bmray.models.world.config import WorldConfig
from bmray.models.world.schema import REGIONS, TYPES
from bmray.models.world.world import Claim, Document, Entity, Fact, World, estimate_entities
from bmray.models.world.writer import write_world

__all__ = ["WorldConfig", "World", "write_world", "estimate_entities", "Entity", "Fact",
           "Document", "Claim", "TYPES", "REGIONS"]
