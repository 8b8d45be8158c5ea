"""Adapters a replica downloads itself, on its own node, from MLflow.

pipelines.serving.deploy resolves a registry URI (models:/NAME@champion) on the deploying machine, pins it
to a version, and hands the replica an `ArtifactRef`: where the adapter folder lies in MLflow's artifact
store and which tracking server to ask. On a cluster the replica runs on another node, which sees neither
the deploying machine's disk nor, necessarily, the artifact store's: it fetches the folder through the
tracking server (`mlflow server --serve-artifacts`) into its node's cache.

    ref = {"artifact_uri": "mlflow-artifacts:/1/models/m-3f2/artifacts/artifacts/adapter",
           "tracking_uri": "http://head:5000", "source": "models:/sparta-tiny@champion (version 3)"}
    folder = local_adapter(ref)          # downloaded once per node; a plain folder path is returned as is
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("ray.serve")

ARTIFACT_KEYS = ("artifact_uri", "tracking_uri")


def is_ref(value) -> bool:
    return isinstance(value, dict) and all(k in value for k in ARTIFACT_KEYS)


def cached_folder(artifact_uri: str, root: Path | None = None) -> Path:
    from workers.data.assets import cache_dir, path_safe

    return (root or cache_dir() / "serve" / "artifacts") / path_safe(artifact_uri)


def local_adapter(value, root: Path | None = None) -> str | None:
    """A local adapter folder for `value`: a path (returned as is) or an ArtifactRef, downloaded into
    `root` (default: <SPARTA_CACHE>/serve/artifacts) unless already there. A pinned model version's files
    never change, so a folder once complete is reused; replicas sharing a node download into temporary
    folders and the first to finish moves its copy into place."""
    if value is None or not is_ref(value):
        return value
    import mlflow

    dest = cached_folder(value["artifact_uri"], root)
    if dest.is_dir():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        log.info("downloading adapter %s from %s", value.get("source") or value["artifact_uri"], value["tracking_uri"])
        got = mlflow.artifacts.download_artifacts(artifact_uri=value["artifact_uri"], dst_path=str(scratch),
                                                  tracking_uri=value["tracking_uri"])
        try:
            os.rename(got, dest)
        except OSError:
            if not dest.is_dir():   # not another replica's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(dest)


def with_local_adapters(config: dict, root: Path | None = None) -> dict:
    """An engine config (workers.serving.engine.EngineConfig fields) whose `adapter` and `adapters` values
    are local folders: every ArtifactRef among them fetched."""
    out = dict(config)
    out["adapter"] = local_adapter(config.get("adapter"), root)
    out["adapters"] = {name: local_adapter(v, root) for name, v in (config.get("adapters") or {}).items()}
    return out
