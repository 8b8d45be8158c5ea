"""cluster.yaml is a valid Ray cluster launcher config (checked with Ray's own validator, nothing launched)."""
import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_yaml_passes_rays_validator():
    config = load()
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0   # trials never land on the head
    assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1 for t in workers)
    assert any("make install" in c for c in config["setup_commands"])
    assert any("MLFLOW_TRACKING_URI" in c for c in config["setup_commands"])


def test_the_validator_does_catch_a_broken_config():
    config = load()
    config["head_node_type"] = "nonexistent"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))
    config = load()
    config["max_workers"] = "many"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))
