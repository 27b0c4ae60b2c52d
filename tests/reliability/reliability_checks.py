"""What the reliability cases check before and after: the registry, the ledger (folder and S3), and the files a
reader could take for whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def registry_state() -> dict[str, list[str]]:
    """Every registered model of the tracking server and its versions."""
    from clipforget.io import registry

    c = registry.client()
    return {m.name: sorted(v.version for v in c.search_model_versions(f"name = '{m.name}'"))
            for m in c.search_registered_models()}


def tree_state(*roots: Path) -> dict[str, bytes]:
    """Every file under the roots (path -> bytes)."""
    out = {}
    for root in roots:
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    out[str(p)] = p.read_bytes()
    return out


def partial_files(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
    """New files a reader could take for whole although nobody vouches for them: anything new except a
    content-addressed blob whose bytes hash to its name (a complete, verified copy of a source)."""
    bad = []
    for path, data in after.items():
        if path in before:
            continue
        p = Path(path)
        if p.parent.name == "sha256" and p.parent.parent.name == "blobs" and \
                hashlib.sha256(data).hexdigest() == p.name.split(".")[0]:
            continue
        bad.append(path)
    return bad


def s3_state(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out
