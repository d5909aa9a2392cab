"""Leases: exactly one holder at a time, with a fencing token that grows at every change
of holder.

FileLease lives in the shared data directory (one machine, or a filesystem every node
mounts): a small JSON record {holder, token, expires} rewritten under an flock held
only for the read-modify-write. EtcdLease lives in etcd (v3 JSON API): a key attached
to an etcd lease with a TTL, created only if absent (a transaction), kept alive while
held; its fencing token is the etcd revision that created it.

Both are time-based: the holder must renew within ``ttl``. The node that holds it
stops serving writes on its own (self-fencing, see node.py) before the time at which
another node may take it, measured from *before* its last successful renewal.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import time
from typing import Any

import httpx

from ..errors import ConfigError
from ..fsutil import durable_json


class LeaseUnavailable(Exception):
    """The lease store cannot be reached: the caller may not assume it holds the lease."""


class FileLease:
    def __init__(self, directory: str, node: str, ttl: float) -> None:
        self.dir = os.path.join(directory, "cluster")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "lease.json")
        self.lock_path = os.path.join(self.dir, "lease.lock")
        self.node, self.ttl = node, ttl
        self.token: int | None = None

    def _locked(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except (FileNotFoundError, ValueError):
            return {"holder": None, "token": 0, "expires": 0.0}

    def _write(self, rec: dict[str, Any]) -> None:
        durable_json(self.path, rec, tmp=f"{self.path}.{self.node}.tmp")

    def try_acquire(self, holder_dead: bool = False, grace: float = 0.0) -> int | None:
        """``holder_dead``: the caller proved the holder's process is gone (it got the
        holder's flock), so the lease is free before it expires. ``grace``: wait this long
        after expiry (the holder may be alive but stalled while still holding its flock)."""
        fd = self._locked()
        try:
            rec, now = self._read(), time.time()
            free = rec["holder"] is None or rec["expires"] + grace <= now or holder_dead
            handed = rec.get("handoff_to") == self.node
            if rec["holder"] == self.node and self.token == rec["token"] and not free:
                return self.token
            if not (free or handed):
                return None
            if free and rec.get("handoff_to") not in (None, self.node) and rec.get("handoff_until", 0) > now:
                return None             # a switchover reserved it for another node
            rec = {"holder": self.node, "token": int(rec["token"]) + 1, "expires": now + self.ttl}
            self._write(rec)
            self.token = rec["token"]
            return self.token
        finally:
            os.close(fd)

    def renew(self) -> bool:
        fd = self._locked()
        try:
            rec = self._read()
            if rec["holder"] != self.node or rec["token"] != self.token:
                self.token = None
                return False
            rec["expires"] = time.time() + self.ttl
            self._write(rec)
            return True
        finally:
            os.close(fd)

    def release(self, handoff_to: str | None = None) -> None:
        fd = self._locked()
        try:
            rec = self._read()
            if rec["holder"] == self.node and rec["token"] == self.token:
                rec.update(holder=None, expires=0.0)
                if handoff_to:
                    rec.update(handoff_to=handoff_to, handoff_until=time.time() + 3 * self.ttl)
                self._write(rec)
            self.token = None
        finally:
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        rec = self._read()
        if rec["holder"] is None or rec["expires"] <= time.time():
            return None
        return {"node": rec["holder"], "token": rec["token"], "expires_in": round(rec["expires"] - time.time(), 3)}


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


class EtcdLease:
    def __init__(self, endpoints: list[str], cluster: str, node: str, ttl: float) -> None:
        if not endpoints:
            raise ConfigError("[cluster] lease = \"etcd\" needs etcd = [\"http://host:2379\", ...]")
        self.endpoints = endpoints
        self.key = f"/bastion/{cluster}/leader"
        self.node, self.ttl = node, ttl
        self.lease_id: str | None = None
        self.token: int | None = None
        # short timeouts: a renewal must fail fast enough to fence before the TTL runs out
        self.http = httpx.Client(timeout=max(0.2, min(1.0, ttl / 4)))

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for ep in self.endpoints:
            try:
                r = self.http.post(ep.rstrip("/") + path, json=body)
                if r.status_code == 200:
                    return r.json()
                last = LeaseUnavailable(f"etcd {ep}{path}: HTTP {r.status_code} {r.text[:200]}")
            except (OSError, httpx.HTTPError, ValueError) as exc:
                last = exc
        raise LeaseUnavailable(f"etcd unreachable ({', '.join(self.endpoints)}): {last}")

    def try_acquire(self, holder_dead: bool = False, grace: float = 0.0) -> int | None:
        if self.token is not None and self.renew():
            return self.token
        rng = self._post("/v3/kv/range", {"key": _b64(self.key)})
        kvs = rng.get("kvs") or []
        if kvs:
            value = json.loads(base64.b64decode(kvs[0]["value"]))
            if value.get("handoff_to") not in (None, self.node) or value.get("node") != "":
                return None
        lease = self._post("/v3/lease/grant", {"TTL": max(1, round(self.ttl))})
        lid = lease["ID"]
        cmp = [{"key": _b64(self.key), "target": "CREATE", "create_revision": "0"}]
        if kvs and json.loads(base64.b64decode(kvs[0]["value"])).get("node") == "":
            # a handoff record (no holder) reserved for us: replace it only if unchanged
            cmp = [{"key": _b64(self.key), "target": "MOD", "mod_revision": kvs[0]["mod_revision"]}]
        put = {"request_put": {"key": _b64(self.key), "value": _b64(json.dumps({"node": self.node})), "lease": lid}}
        res = self._post("/v3/kv/txn", {"compare": cmp, "success": [put]})
        if not res.get("succeeded"):
            self._post("/v3/lease/revoke", {"ID": lid})
            return None
        self.lease_id, self.token = lid, int(res["header"]["revision"])
        return self.token

    def renew(self) -> bool:
        if self.lease_id is None:
            return False
        res = self._post("/v3/lease/keepalive", {"ID": self.lease_id})
        ttl = int((res.get("result") or {}).get("TTL", 0) or 0)
        if ttl <= 0:
            self.lease_id = self.token = None
            return False
        return True

    def release(self, handoff_to: str | None = None) -> None:
        if self.lease_id is None:
            return
        if handoff_to:
            # leave a record without a lease that only handoff_to may replace (expires on its own: TTL 3×)
            lease = self._post("/v3/lease/grant", {"TTL": max(1, round(3 * self.ttl))})
            self._post("/v3/kv/txn", {"compare": [], "success": [{"request_put": {
                "key": _b64(self.key), "value": _b64(json.dumps({"node": "", "handoff_to": handoff_to})),
                "lease": lease["ID"]}}]})
        self._post("/v3/lease/revoke", {"ID": self.lease_id})
        self.lease_id = self.token = None

    def holder(self) -> dict[str, Any] | None:
        kvs = self._post("/v3/kv/range", {"key": _b64(self.key)}).get("kvs") or []
        if not kvs:
            return None
        value = json.loads(base64.b64decode(kvs[0]["value"]))
        if not value.get("node"):
            return None
        return {"node": value["node"], "token": int(kvs[0]["mod_revision"])}
