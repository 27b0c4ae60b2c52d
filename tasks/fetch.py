"""Step 0: the inputs, fetched into the local content-addressed cache."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from clipforget.storage import fetch, fetch_tree
from tasks.common import retry_if_transient


@task(name="fetch_checkpoint", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_if_transient)
def fetch_checkpoint(uri: str | None, sha256: str | None = None) -> dict:
    """`s3://`, `file://` or a path (None: the bundled toy weights) → {path, sha256, uri, cached}."""
    from clipforget.models import TOY_WEIGHTS

    logger = get_run_logger()
    got = fetch(uri or TOY_WEIGHTS, sha256, log=logger.warning)
    logger.info("checkpoint %s: sha256 %s (%s)", got.uri, got.sha256, "cache hit" if got.cached else "fetched")
    return got.to_dict()


@task(name="fetch_eval_data", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_if_transient)
def fetch_eval_data(uri: str) -> str:
    """A labelled `<domain>/<class>/` folder: local in place, an S3 prefix mirrored into the cache."""
    path = fetch_tree(uri, log=get_run_logger().warning)
    get_run_logger().info("evaluation data %s at %s", uri, path)
    return str(path)
