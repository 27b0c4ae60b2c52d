"""Step 0: the inputs, fetched into the local content-addressed cache and checked before any work."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from clipforget.io.storage import fetch, fetch_tree
from tasks.common import retry_if_transient


@task(name="fetch_checkpoint", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_if_transient)
def fetch_checkpoint(uri: str | None, sha256: str | None = None) -> dict:
    """`s3://`, `file://` or a path (None: the bundled toy weights) → {path, sha256, uri, cached}.

    A safetensors checkpoint's header is checked against the file at once (a truncated file or a forged header
    fails here, naming the problem), and a freshly fetched file that fails leaves nothing in the cache."""
    from clipforget.io.checkpoints import TOY_WEIGHTS, ModelLoadError, check_safetensors

    logger = get_run_logger()
    got = fetch(uri or TOY_WEIGHTS, sha256, log=logger.warning)
    if got.path.suffix == ".safetensors":
        try:
            check_safetensors(got.path)
        except ModelLoadError as e:
            if not got.cached:
                Path(got.path).unlink(missing_ok=True)
            raise ModelLoadError(f"{got.uri}: {e}") from None
    logger.info("checkpoint %s: sha256 %s (%s)", got.uri, got.sha256, "cache hit" if got.cached else "fetched")
    return got.to_dict()


@task(name="fetch_eval_data", retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_condition_fn=retry_if_transient)
def fetch_eval_data(uri: str, grid: dict | None = None) -> str:
    """A labelled `<domain>/<class>/` folder: local in place, an S3 prefix mirrored into the cache. Every image is
    checked (layout, symlinks out of the folder, not an image, corrupt, too small or too large) before any work,
    and with `grid` ({name, classes, domains}) every class and domain folder must be one of the grid's."""
    import shutil

    from clipforget.io.storage import cache_root
    from clipforget.method.data import check_labelled_folder
    from clipforget.method.grid import Grid

    path = fetch_tree(uri, log=get_run_logger().warning)
    mirror = path.is_relative_to(cache_root() / "trees")
    try:
        items = check_labelled_folder(path, None if grid is None else
                                      Grid.from_dict(grid))
    except ValueError as e:
        if mirror:  # a mirror of bad data is not kept as if it were usable; the error names the prefix
            shutil.rmtree(path, ignore_errors=True)
            raise ValueError(str(e).replace(str(path), uri.rstrip("/"))) from None
        raise
    get_run_logger().info("evaluation data %s at %s: %d images checked", uri, path, len(items))
    return str(path)
