"""s3:// repositories: s3fs; a PUT is atomic and durable once answered."""

from __future__ import annotations

import errno
import os
from typing import Any

from ...errors import UsageError
from .base import StoreError, StoreRefused
from .remote import RemoteStore, _Missing

# ----------------------------------------------------------------------------------------------
# S3


class S3Store(RemoteStore):
    scheme = "s3"
    options = RemoteStore.options + ("endpoint_url", "region", "profile")

    def _parse(self, parsed: Any, opts: dict[str, str]) -> None:
        try:
            import s3fs  # noqa: F401
        except ImportError as exc:
            raise UsageError(f"s3:// repositories need s3fs: {exc}",
                             hint="run `make setup` (or pip install s3fs)") from None
        if parsed.username or parsed.password:
            raise UsageError("s3 URL: credentials in the URL would be shown in listings and logs; refused",
                             hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ?profile=)")
        if not parsed.hostname:
            raise UsageError(f"{self.url}: no bucket", hint="s3://bucket/prefix")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.root = f"{self.bucket}/{prefix}" if prefix else self.bucket
        self.endpoint = opts.get("endpoint_url") or None
        self.profile = opts.get("profile") or None
        self.region = opts.get("region") or None

    def _connect(self) -> Any:
        import s3fs
        client_kwargs = {"region_name": self.region} if self.region else {}
        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint, profile=self.profile, client_kwargs=client_kwargs,
            skip_instance_cache=True, use_listings_cache=False,
            # retries are ours (one policy for every store), not botocore's nor s3fs's
            config_kwargs={"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                           "retries": {"total_max_attempts": 1, "mode": "standard"}})
        fs.retries = 1
        fs._bastion_close = lambda: None   # s3fs closes its session when the instance is collected
        return fs

    def _deadline(self, size: int = 0) -> float:
        """A hard limit per call, on top of the socket time-outs: an upload to a server that
        accepted the connection and then stopped answering is not covered by read_timeout
        (seen with moto frozen: the PUT waited as long as the server did). fsspec cancels
        the request when it passes. Bodies get 1 s per MB on top."""
        return self.connect_timeout + self.read_timeout + size / 1e6

    def _probe(self, fs: Any) -> None:
        fs.call_s3("head_bucket", Bucket=self.bucket, timeout=self._deadline())

    def _endpoint_name(self) -> str:
        return self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") \
            or "AWS S3"

    def _classify(self, exc: BaseException, what: str) -> str:
        import botocore.exceptions as bx
        code = _s3_code(exc)
        ep = self._endpoint_name()
        if code == "NoSuchBucket" or (what.startswith("connecting") and isinstance(exc, FileNotFoundError)):
            raise StoreRefused(f"{what} {self.url}: bucket {self.bucket!r} does not exist at {ep}",
                               hint=f"create it (aws s3 mb s3://{self.bucket}), or fix the bucket name or the "
                                    "endpoint (?endpoint_url= or AWS_ENDPOINT_URL_S3)") from None
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            raise StoreRefused(f"{what} {self.url}: no AWS credentials found ({exc})",
                               hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
                                    "temporary ones) in the environment of the process that runs this (for "
                                    "backups: the daemon), or AWS_PROFILE / ?profile= for ~/.aws/credentials"
                               ) from None
        if isinstance(exc, PermissionError):
            raise StoreRefused(
                f"{what} {self.url}: {ep} refused access to bucket {self.bucket!r} ({exc})",
                hint="check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ?profile=) "
                     "and that they may list, read, write and delete objects in the bucket") from None
        if isinstance(exc, ValueError):
            raise UsageError(f"{what} {self.url}: {exc}", hint="check the URL and its options") from None
        if isinstance(exc, (bx.ConnectionError, bx.HTTPClientError)):
            return f"cannot talk to {ep} ({exc})"
        try:
            import aiohttp
            if isinstance(exc, aiohttp.ClientError):
                return f"cannot talk to {ep} ({exc})"
        except ImportError:
            pass
        if isinstance(exc, TimeoutError):
            return f"no answer from {ep} (timed out)"
        if isinstance(exc, ConnectionError):
            return f"cannot talk to {ep} ({type(exc).__name__}: {exc})"
        if isinstance(exc, FileNotFoundError):
            raise StoreError(f"{what} {self.url}: not found ({exc})") from None
        if isinstance(exc, OSError) and exc.errno in (errno.EIO, getattr(errno, "EREMOTEIO", errno.EIO),
                                                       errno.EBUSY, None):
            return f"{ep} answered with an error ({exc})"   # 5xx, SlowDown: worth another try
        raise StoreError(f"{what} {self.url}: {type(exc).__name__}: {exc}",
                         hint="this looks permanent; check the URL, the bucket and the credentials") from None

    # primitives
    def _missing(self, exc: FileNotFoundError) -> Exception:
        if _s3_code(exc) == "NoSuchBucket":
            return exc    # not a missing object: classified as a missing bucket
        return _Missing()

    def _read(self, fs: Any, path: str) -> bytes:
        try:
            return fs.cat_file(path, timeout=self._deadline(64_000_000))
        except FileNotFoundError as exc:
            raise self._missing(exc) from None

    def _read_range(self, fs: Any, path: str, offset: int, length: int) -> bytes:
        try:    # one ranged GET (format-2 packs: a run of pages, not the whole pack)
            return bytes(fs.cat_file(path, start=offset, end=offset + length, timeout=self._deadline(length)))
        except FileNotFoundError as exc:
            raise self._missing(exc) from None

    def _write(self, fs: Any, path: str, data: bytes) -> None:
        fs.pipe_file(path, data, timeout=self._deadline(len(data)))

    def _stat(self, fs: Any, path: str) -> None:
        key = path[len(self.bucket) + 1:]
        try:
            fs.call_s3("head_object", Bucket=self.bucket, Key=key, timeout=self._deadline())
        except FileNotFoundError as exc:
            raise self._missing(exc) from None

    def _find(self, fs: Any, path: str) -> list[str]:
        prefix = path[len(self.bucket) + 1:].rstrip("/") + "/" if path != self.bucket else ""
        out: list[str] = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = fs.call_s3("list_objects_v2", timeout=self._deadline(), **kw)
            out += [f"{self.bucket}/{o['Key']}" for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        return out

    def _rm(self, fs: Any, path: str) -> None:
        fs.call_s3("delete_object", Bucket=self.bucket, Key=path[len(self.bucket) + 1:], timeout=self._deadline())


def _s3_code(exc: BaseException) -> str | None:
    for e in (exc, exc.__cause__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            return resp.get("Error", {}).get("Code")
    return None
