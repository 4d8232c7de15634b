"""Local paths and s3:// URLs behind one small interface (boto3; credentials from the standard AWS chain).

Endpoint, region and credentials come from the environment or profile as boto3 reads them (AWS_ENDPOINT_URL,
AWS_PROFILE, ...); nothing here prints or logs them. Writes never expose partial content under the final name:
local files are written to a temporary name in the same directory and renamed; S3 objects appear only once
uploaded completely (S3 PUT semantics).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

from relret.run_dir import atomic_file


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """ "s3://bucket/a/b" -> ("bucket", "a/b")."""
    rest = str(url)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path components for local paths and s3:// URLs alike."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


@functools.cache
def _client_for_pid(pid: int):
    import boto3

    return boto3.session.Session().client("s3")


def s3_client():
    """A boto3 S3 client for this process (clients are not shared across fork)."""
    return _client_for_pid(os.getpid())


def exists(url: str | os.PathLike) -> bool:
    if not is_s3(url):
        return Path(url).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(str(url))
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def size(url: str | os.PathLike) -> int:
    if not is_s3(url):
        return Path(url).stat().st_size
    bucket, key = split_s3(str(url))
    return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])


def list_files(base: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Files directly under `base` whose name matches the glob `pattern`, sorted, as full paths/URLs."""
    if not is_s3(base):
        root = Path(base)
        return sorted(str(p) for p in root.glob(pattern) if p.is_file()) if root.is_dir() else []
    bucket, prefix = split_s3(str(base))
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    out = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if fnmatch.fnmatchcase(name, pattern):
                out.append(f"s3://{bucket}/{obj['Key']}")
    return sorted(out)


def read_bytes(url: str | os.PathLike) -> bytes:
    if not is_s3(url):
        return Path(url).read_bytes()
    bucket, key = split_s3(str(url))
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def open_read(url: str | os.PathLike) -> BinaryIO:
    """A readable binary stream (a streaming body for S3: nothing is downloaded ahead)."""
    if not is_s3(url):
        return open(url, "rb")  # noqa: SIM115 (the caller closes it)
    bucket, key = split_s3(str(url))
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"]


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write `data` so that the final name only ever holds complete content."""
    with atomic_local_file(url) as tmp:
        Path(tmp).write_bytes(data)


def upload_file(local_path: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy a complete local file to `url` (local: copy to a temporary name, then rename)."""
    if is_s3(url):
        bucket, key = split_s3(str(url))
        s3_client().upload_file(str(local_path), bucket, key)
        return
    with atomic_local_file(url) as tmp:
        shutil.copyfile(local_path, tmp)


def remove(url: str | os.PathLike) -> None:
    if is_s3(url):
        bucket, key = split_s3(str(url))
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(url).unlink(missing_ok=True)


@contextmanager
def atomic_local_file(url: str | os.PathLike, staging_dir: str | None = None) -> Iterator[str]:
    """Yield a temporary local path; on success its content appears at `url` in one step, on error nowhere.

    Local targets: `relret.run_dir.atomic_file` (a temporary file beside the target, renamed). S3 targets: the
    temporary file sits in `staging_dir` (default: the system temp dir) and is uploaded once complete.
    """
    if not is_s3(url):
        with atomic_file(url) as tmp:
            yield tmp
        return
    fd, tmp = tempfile.mkstemp(prefix=".relret-", suffix=".part", dir=staging_dir)
    os.close(fd)
    try:
        yield tmp
        upload_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _webdataset_s3_opener(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs) -> IO[bytes]:
    if mode not in ("r", "rb"):
        raise ValueError(f"s3 URLs are read-only for webdataset (mode {mode!r})")
    return open_read(url)


def register_webdataset_s3() -> None:
    """Teach webdataset's gopen to stream s3:// URLs through boto3 (also in forked DataLoader workers)."""
    import webdataset as wds

    wds.gopen_schemes["s3"] = _webdataset_s3_opener
