"""cluster.yaml is a valid Ray autoscaler config (Ray's own schema and validator)."""
from __future__ import annotations

import json
import os

import jsonschema
import ray
import yaml

from tests.conftest import REPO


def load() -> dict:
    with open(os.path.join(REPO, "cluster.yaml")) as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_matches_rays_schema():
    schema_path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(schema_path) as fh:
        schema = json.load(fh)
    jsonschema.validate(load(), schema)


def test_cluster_yaml_passes_rays_validator_and_scales_gpu_workers_from_zero():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load())
    validate_config(config)
    workers = {k: v for k, v in config["available_node_types"].items()
               if k != config["head_node_type"]}
    assert any(v["min_workers"] == 0 and v["max_workers"] > 0 for v in workers.values())
    assert "2.60.0" in config["docker"]["image"] and "gpu" in config["docker"]["image"]
