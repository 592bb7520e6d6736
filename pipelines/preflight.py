"""Checks of a run's output before any work: the bucket exists, the credentials open it, the folder is writable.

Why before any work: S3-compatible stores differ (some create a missing bucket on the first PUT, some
refuse), so a typo in ``--output`` must not become a new bucket, and bad credentials must read as one line,
not as tracebacks from the first worker that touches storage.
"""

from __future__ import annotations

import os

from mplug2 import storage
from pipelines.errors import ConfigError


def _short(exc: BaseException, n: int = 160) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[:n] + "..."


def credentials_error(url: str, exc: BaseException) -> ConfigError:
    """The one-line error for a refused or unauthenticated storage request."""
    return ConfigError(f"access to {url} denied ({type(exc).__name__}: {_short(exc)}); check the credentials "
                       "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, AWS_ENDPOINT_URL) and the "
                       "bucket policy")


def check_output(url: str) -> None:
    """Raise :class:`ConfigError` if ``url`` cannot be written; ``StorageUnavailableError`` if the store does
    not answer within the retry deadline. Never creates a bucket."""
    if not storage.is_remote(url):
        path = os.path.abspath(url)
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f"--output {url}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--output {url}: no write permission on {parent}")
        return
    bucket = url[len("s3://"):].split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"--output {url}: no bucket name")
    try:
        storage.retry_io(lambda: storage.get_fs(url)[0].call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1),
                         what=f"check bucket s3://{bucket}")
    except FileNotFoundError:
        endpoint = storage.s3_endpoint() or "AWS S3"
        raise ConfigError(f"output bucket s3://{bucket} does not exist on {endpoint}; create it first "
                          f"(e.g. `aws s3 mb s3://{bucket}`) or fix --output") from None
    except PermissionError as exc:
        raise credentials_error(f"s3://{bucket}", exc) from None
    except storage.StorageUnavailableError:
        raise
    except Exception as exc:  # botocore's NoCredentialsError and friends are not OSErrors
        if "Credential" in type(exc).__name__ or "Signature" in str(exc):
            raise credentials_error(f"s3://{bucket}", exc) from None
        raise


def check_manifest_provenance(prev: dict | None, paths: list[str], output: str) -> None:
    """Refuse an ``incremental`` run whose manifests are not the ones ``dataset.json`` records.

    Why refuse rather than merge: an incremental run numbers rows from 0 of *its* manifests, so shard
    ``i`` of a different manifest is other rows; adding them and rewriting ``dataset.json`` would lose the
    earlier shards' provenance silently. Extending with new rows is ``--mode extend``, which records every
    manifest with its shard range. Files are compared by path and size, then by sha256 when both sizes match.
    """
    recorded = [m for m in (prev or {}).get("manifests", []) if "path" in m]
    if not recorded:
        return

    def norm(p: str) -> str:  # ./m.jsonl and /abs/m.jsonl name the same file
        return p if storage.is_remote(p) else os.path.abspath(p)

    before = {norm(m["path"]): m for m in recorded}
    now = {norm(p): p for p in paths}
    added = sorted(now[p] for p in set(now) - set(before))
    removed = sorted(before[p]["path"] for p in set(before) - set(now))
    changed: list[str] = []
    if not added and not removed:
        from pipelines.sources import file_info

        for p in paths:
            old = before[norm(p)]
            if "size" not in old:
                continue
            fs, path = storage.get_fs(p)
            if int(fs.size(path)) != int(old["size"]) or ("sha256" in old and file_info(p)["sha256"] != old["sha256"]):
                changed.append(p)
    if added or removed or changed:
        what = "; ".join(x for x in (f"new: {added}" if added else "", f"missing: {removed}" if removed else "",
                                    f"changed since: {changed}" if changed else "") if x)
        raise ConfigError(f"{output} was built from other manifests ({what}); an incremental run would mix "
                          "rows of different files under one dataset.json. Use --mode extend to append the "
                          "new rows (each manifest is recorded with its shard range), --mode overwrite to "
                          "rebuild, or pass the original manifests")
