"""Registry calls leave the process's MLflow URIs as they found them (they point MLflow's fluent API at a server with
process-wide setters that also export environment variables)."""

from __future__ import annotations

import mlflow

from clipforget.io import registry


def test_a_registry_call_puts_the_mlflow_uris_back(monkeypatch):
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # start from a process whose MLflow was never pointed anywhere (earlier tests in this worker may have)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)

    @registry._restores_mlflow_uris
    def points_elsewhere() -> str:
        mlflow.set_tracking_uri("http://127.0.0.1:9")  # e.g. a fault proxy that is gone afterwards
        mlflow.set_registry_uri("http://127.0.0.1:9")
        return mlflow.get_registry_uri()

    assert points_elsewhere() == "http://127.0.0.1:9"
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:5000"
    assert mlflow.MlflowClient("http://127.0.0.1:7")._registry_uri == "http://127.0.0.1:7"  # not the stale :9
