"""A replica's own download of a registry adapter (workers.serving.artifacts), from a real MLflow store."""
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from workers.serving.artifacts import cached_folder, local_adapter, with_local_adapters


@pytest.fixture
def logged(tmp_path):
    """An adapter-like folder logged as run artifacts in a sqlite store: (ArtifactRef, the folder)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"method": "cla"}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    client = MlflowClient(uri)
    exp = client.create_experiment("fetch", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(folder), "adapter")
    ref = {"artifact_uri": f"runs:/{run.info.run_id}/adapter", "tracking_uri": uri, "source": "a test run"}
    return ref, folder


def test_a_reference_is_downloaded_once_into_the_nodes_cache(logged, tmp_path):
    ref, folder = logged
    root = tmp_path / "node-cache"
    got = Path(local_adapter(ref, root))
    assert got == cached_folder(ref["artifact_uri"], root) and got.parent == root
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {p.name: p.read_bytes() for p in folder.iterdir()}
    (got / "marker").write_text("kept")          # a complete folder is reused, not downloaded again
    assert Path(local_adapter(ref, root)) == got and (got / "marker").read_text() == "kept"
    assert [p.name for p in root.iterdir()] == [got.name]   # no scratch folder left behind


def test_folders_pass_through_and_only_references_are_fetched(logged, tmp_path):
    ref, folder = logged
    cfg = {"model": "random:llama-tiny", "adapter": None, "adapters": {"mine": str(folder), "best": ref}}
    out = with_local_adapters(cfg, tmp_path / "node-cache")
    assert out["adapters"]["mine"] == str(folder) and out["adapter"] is None and out["model"] == cfg["model"]
    assert Path(out["adapters"]["best"], "adapter_config.json").read_text() == '{"method": "cla"}'
    assert cfg["adapters"]["best"] is ref   # the caller's config is left as it was


def test_a_missing_artifact_fails_and_leaves_nothing_behind(logged, tmp_path):
    ref, _ = logged
    root = tmp_path / "node-cache"
    with pytest.raises(MlflowException, match="Failed to download artifacts from path 'nothing-here'"):
        local_adapter({**ref, "artifact_uri": ref["artifact_uri"].replace("/adapter", "/nothing-here")}, root)
    assert not any(root.iterdir())
