"""Reading database files into the repository, in a child process.

The daemon holds SQLite locks on the files it protects, and closing any file
descriptor on a file drops every POSIX lock the process holds on it
(DESIGN.md, pitfalls). So the bytes are read here, in a process of their own,
while the daemon keeps the files in continuous operations: the main files do
not change while we read them, and we open them through SQLite only as
``immutable`` (main file alone, no locks) for the content digests.

    python -m bastion.backup.snapshot < request.json > result.json
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import BastionError
from .digest import file_digests
from .repository import Repository

DEFAULT_CHUNK = 256 * 1024


def snapshot(repo_url: str, files: list[dict[str, str]], chunk_size: int = DEFAULT_CHUNK,
             jobs: int = 4) -> dict[str, Any]:
    repo = Repository.open(repo_url, create=True)
    known = repo.chunk_digests()
    t0 = time.monotonic()
    added_bytes = 0
    new_chunks = 0
    out_files = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for spec in files:
            path = spec["path"]
            whole = hashlib.sha256()
            chunks: list[list[Any]] = []
            pending = []
            size = 0
            with open(path, "rb") as fh:
                header = fh.read(100)
                fh.seek(0)
                page_size = int.from_bytes(header[16:18], "big") if len(header) >= 18 else 0
                page_size = 65536 if page_size == 1 else page_size
                while True:
                    data = fh.read(chunk_size)
                    if not data:
                        break
                    size += len(data)
                    whole.update(data)
                    digest = hashlib.sha256(data).hexdigest()
                    chunks.append([digest, len(data)])
                    if digest not in known:
                        known.add(digest)
                        new_chunks += 1
                        pending.append(pool.submit(repo.put_chunk, data, digest))
            for fut in pending:
                added_bytes += fut.result()[1]
            out_files.append({"path": path, "name": spec["name"], "size": size, "page_size": page_size,
                              "sha256": whole.hexdigest(), "chunks": chunks,
                              "tables": file_digests(path, immutable=True)})
    return {"files": out_files, "stored_bytes_added": added_bytes, "chunks_new": new_chunks,
            "chunks_total": sum(len(f["chunks"]) for f in out_files), "seconds": time.monotonic() - t0}


def snapshot_in_child(repo_url: str, files: list[dict[str, str]], chunk_size: int = DEFAULT_CHUNK,
                      jobs: int = 4) -> dict[str, Any]:
    request = json.dumps({"repo": repo_url, "files": files, "chunk_size": chunk_size, "jobs": jobs})
    proc = subprocess.run([sys.executable, "-m", "bastion.backup.snapshot"], input=request,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        try:
            err = json.loads(proc.stdout)["error"]
        except (ValueError, KeyError, TypeError):
            raise BastionError(f"the backup reader process failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}") from None
        raise BastionError.from_dict(err)
    return json.loads(proc.stdout)


def _main() -> None:
    req = json.load(sys.stdin)
    try:
        res = snapshot(req["repo"], req["files"], int(req.get("chunk_size", DEFAULT_CHUNK)), int(req.get("jobs", 4)))
    except BastionError as exc:
        print(json.dumps({"error": exc.to_dict()}))
        sys.exit(2)
    except OSError as exc:
        print(json.dumps({"error": BastionError(f"reading for backup: {exc}").to_dict()}))
        sys.exit(2)
    print(json.dumps(res))


if __name__ == "__main__":
    _main()
