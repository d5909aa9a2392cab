"""Multi-site sync benchmark (issue 5): throughput, and convergence after a partition heals.

    .venv/bin/python bench/bench_sync.py [--rows 50000] [--stream 20000] [--changes 10000] [--reps 3]
        [--partition relay|netns] [--hold S] [--writers abc] [--no-probe] [--profile]
        [--bank-seconds 30] [--skip throughput|convergence|bank] [--keep]

Every site is a real `bastion serve` with its own copy of shop.db; applications write a site's
file from their own processes (stdlib sqlite3, WAL, synchronous=NORMAL). Site a starts with the
data; the others join by copying a's file (the daemon's own join).

1. Throughput. Two sites a and b (pair), schedule "manual". a's application makes the changes;
   then `bastion sync run shop` on a is timed until it returns, which is when b applied the last
   batch (end to end: ingest of capture's log into the sync log + read + msgpack + HTTP + apply
   + b's vector back); b's content is then compared with a's (per-table digests). Three loads:
     inserts   --rows new rows in 5 transactions;
     updates   every one of those rows updated, in 5 transactions;
     stream    --stream 1-row commits (half inserts, half updates of random rows), as fast as the
               application goes: the same work per change, many more transactions.
   "minus an empty sync run" subtracts the wall time of a `sync run` with nothing to send (the
   CLI's Python start-up, mostly; the pass itself takes a few ms through the API).
   Baselines, on copies of a's and b's files taken (sqlite3 backup API) just before the run:
     engine    in a child process, bastion.sync.site on the copies, no daemon, no HTTP: the loop
               the daemon runs (changes_for a batch of 2,000 from b's vector, apply to b, b's
               vector), timed per step; the batches also go through to_wire + msgpack + unpack +
               from_wire as in the daemon, timed apart ("no msgpack" = the run minus that step);
     plain     the application's own statements replayed into b's copy in one transaction with
               triggers off (apsw, the daemon's SQLite): what writing the rows costs, nothing else.
2. Convergence after a partition. Three sites a, b, c in a mesh, schedule "continuous". Per
   repetition: c is cut off from a and b; a probe row is written at a, then another 0.5 s later:
   the time until b holds the second is "a->b while cut" (a and b must keep syncing while c is
   away); the applications of the three sites make --changes changes at once (a 34 %, b 33 %,
   c 33 %: upserts of rows every site writes, so c's versions conflict with a's and b's;
   deletes at c of rows a updates; upserts of rows of each site's own; inserts in both tables;
   50 changes per transaction); the bench waits until a and b agree and the cut is --hold old
   (1 s at least), reads each site's pending changes from the files ("lacks": changes another
   site holds that it does not, counting what capture logged and sync did not read yet), heals,
   and polls: every ~10 ms each site's vector (_bastion_sync_seen + capture entries not read),
   and, every 0.1 s or as soon as every site holds every change, the per-table SHA-256 digests
   of the user tables. "same content" is bracketed by the last poll whose digests differed and
   the first whose three digests were equal (the goal is judged on the latter). 0.5 s later the
   full content of the three files is compared and PRAGMA integrity_check run on each: a
   difference is a failure (exit 1), not a MISS. Also per repetition: changes sent during the
   heal (the daemons' per-neighbour counters; duplicates included), the conflicts each site
   recorded, and from the daemons' logs (httpx logs every answered request with ms timestamps)
   per direction the batches sent after healing and when the first and last were answered.
   The partition, --partition:
     relay  (default) every site reaches every other through its own TCP relay (a child process
            of this bench, one listening port per direction); the cut closes the relays of c's
            four directions: open connections are reset (SO_LINGER 0), new ones refused. A
            partition that answers (RST), as a firewall that rejects or a host that is down.
     netns  each daemon in its own network namespace on a bridge (needs root and `ip`); the cut
            sets the root end of c's veth down: packets vanish, nothing answers (a cable pulled).
   --writers c --no-probe: only c's application writes during the partition, nothing is sent
   to c: shows how long c's own changes wait after the heal (its pass loop's back-off).
3. The bank (issue 18): three sites a, b, c in a mesh, each running the unmodified bank workload
   (`python -m bastion.workload run`: per transfer two accounts moved with ``balance = balance
   -/+ ?``, the transfer count bumped, one audit row inserted with the next number) for
   --bank-seconds while no site reaches another (every site numbers its audit rows 1, 2, 3...:
   they collide and are re-keyed; ``accounts.balance`` and ``meta.value`` are counter columns).
   Then all links heal; polled every 50 ms: the time until the three sites hold the same vectors
   and the same rows in both files ("converged", goal < 2 s), the daemons' CPU seconds meanwhile,
   the changes the daemons sent meanwhile (their per-neighbour counters) against the changes
   needed (each change to the two other sites once: more is changes sent twice, skipped there),
   and then: audit rows lost or doubled at any site (goal 0), the total balance (goal: unchanged)
   and the transfer count equal to the audit rows, integrity_check. A lost row or money created
   is a failure (exit 1).
4. The load average at start and end (shared 2-core machine).

--profile: py-spy records every daemon (50 samples/s) from 1 s before the first heal to 0.5 s
after it converged (stacks in the kept temp dir, per thread and innermost Bastion function
printed); it takes CPU from the daemons, so that repetition converges more slowly.
Prints tables and writes bench/out/sync.json. The exit code is non-zero only when something
broke (content differs, integrity_check fails, a step fails); a missed goal prints MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, whatever the cwd
from _common import ENV, OUT, PY, Daemon, free_port, log, write_config

SCHEMA = ["CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER, note TEXT)",
          "CREATE TABLE events(id INTEGER PRIMARY KEY, item INTEGER, kind TEXT, at REAL)"]
UPSERT = ("INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?) "
          "ON CONFLICT(id) DO UPDATE SET qty = excluded.qty, note = excluded.note")
TX_CHANGES = 50


class Broken(Exception):
    """Something that must not happen (content differs, integrity_check fails): exit 1."""


# -- files, read from this process (stdlib sqlite3, read-only; the daemons are other processes) --

def ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def user_tables(con: sqlite3.Connection) -> list[str]:
    return [r[0] for r in con.execute("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE "
                                      "'\\_bastion\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
                                      "ORDER BY name")]


def digests(path: Path) -> dict[str, str]:
    """Per user table: SHA-256 of its rows in rowid order (Bastion's own tables differ by site)."""
    con = ro(path)
    try:
        con.execute("BEGIN")
        out = {}
        for t in user_tables(con):
            h = hashlib.sha256()
            for row in con.execute(f'SELECT * FROM "{t}" ORDER BY rowid'):
                h.update(repr(row).encode())
            out[t] = h.hexdigest()
        return out
    finally:
        con.close()


def dump(path: Path) -> dict[str, list[tuple]]:
    con = ro(path)
    try:
        con.execute("BEGIN")
        return {t: con.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in user_tables(con)}
    finally:
        con.close()


def integrity(path: Path) -> str:
    con = ro(path)
    try:
        return "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
    finally:
        con.close()


def held(target: Path | sqlite3.Connection) -> dict[str, int]:
    """Per origin, the changes this site holds: its sync vector, plus, for its own origin, what
    capture logged and sync has not read yet (those are held, just not ingested). ``target``: a
    file, or a read-only connection kept open by the caller (a poll then costs ~0.1 ms of CPU)."""
    con = target if isinstance(target, sqlite3.Connection) else ro(target)
    try:
        con.execute("BEGIN")
        vec = dict(con.execute("SELECT origin, oseq FROM _bastion_sync_seen"))
        site = con.execute("SELECT value FROM _bastion_sync_meta WHERE key = 'site'").fetchone()[0]
        ingested = int(con.execute("SELECT value FROM _bastion_sync_meta WHERE key = 'ingested'").fetchone()[0])
        new = con.execute("SELECT count(*) FROM _bastion_log WHERE seq > ? AND op IN (1, 2, 3)",
                          (ingested,)).fetchone()[0]
        vec[site] = vec.get(site, 0) + new
        vec["_not_ingested"] = new
        return vec
    finally:
        if con is target:
            con.execute("COMMIT")      # ends the read: no snapshot held between polls
        else:
            con.close()


def lacking(vectors: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per site: changes some other site holds that it lacks."""
    origins = {o for v in vectors.values() for o in v if not o.startswith("_")}
    top = {o: max(v.get(o, 0) for v in vectors.values()) for o in origins}
    return {s: sum(top[o] - v.get(o, 0) for o in origins) for s, v in vectors.items()}


def backup_copy(src: Path, dst: Path) -> None:
    """A consistent copy through SQLite (the backup API), as any reader may take one."""
    s, d = ro(src), sqlite3.connect(dst)
    try:
        s.backup(d)
    finally:
        d.close()
        s.close()


# -- sites: real daemons ------------------------------------------------------------------------

class SiteDaemon(Daemon):
    """`bastion serve` of one site. ``wrap``: a prefix for the command (ip netns exec NS)."""

    def __init__(self, base: Path, name: str, listen: str, sites: dict[str, str], token: Path, topology: str,
                 schedule: str, wrap: list[str] | None = None) -> None:
        self.name, self.listen, self.wrap = name, listen, wrap or []
        self.dir = base / name
        self.dir.mkdir(parents=True)
        self.db = self.dir / "shop.db"
        addr, port = listen.rsplit(":", 1)
        super().__init__(write_config(self.dir, int(port), {"shop": {"files": [self.db], "sync_group": "g"}},
                                      addr=addr, sections={
                                          "replication": {"peer_token_file": token}, "sync": {"site": name},
                                          "sync_groups.g": {"sites": sites, "topology": topology,
                                                            "schedule": schedule}}), int(port), addr=addr)

    def command(self) -> list[str]:
        return [*self.wrap, *super().command()]

    def start(self, timeout: float = 30) -> SiteDaemon:
        try:
            return super().start(timeout)
        except RuntimeError as exc:
            raise Broken(f"daemon {self.name} did not start: {str(exc)[-3000:]}") from exc

    def report(self, *args: str, ok: tuple[int, ...] = (0,), timeout: float = 600) -> tuple[float, dict[str, Any]]:
        """(wall seconds, JSON answer) of `bastion ARGS --json`, run where the daemon runs."""
        t = time.perf_counter()
        p = subprocess.run([*self.wrap, PY, "-m", "bastion", "--config", str(self.config), *args, "--json"],
                           capture_output=True, text=True, timeout=timeout, env=ENV, check=False)
        secs = time.perf_counter() - t
        if p.returncode not in ok:
            raise Broken(f"site {self.name}: bastion {' '.join(args)} exited {p.returncode}: {p.stderr or p.stdout}")
        return secs, json.loads(p.stdout)

    @property
    def pid(self) -> int:
        """The Python process of the daemon (under `ip netns exec`, which execs it: the same pid)."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20) -> None:
        super().stop(timeout)


def seed_file(db: Path, items: int) -> None:
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    for s in SCHEMA:
        con.execute(s)
    con.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                    ((i, f"item {i}", i % 97, "seed") for i in range(1, items + 1)))
    con.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", ((i, i, "seed", 0.0) for i in range(1, 101)))
    con.commit()
    con.close()


def run_app(db: Path, plan: list[list[list[Any]]], scratch: Path) -> subprocess.Popen:
    """An application in its own process runs ``plan``: transactions of [sql, rows] (executemany)."""
    p = scratch / f"plan-{secrets.token_hex(4)}.json"
    p.write_text(json.dumps(plan))
    return subprocess.Popen([PY, __file__, "--child", "app", str(db), str(p)], env=ENV, stdout=subprocess.PIPE,
                            text=True)


def app_result(proc: subprocess.Popen) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise Broken(f"an application exited {proc.returncode}")
    return json.loads(out)


def child(args: list[str]) -> int:
    """The bench's own child processes: an application, the engine baseline, the plain baseline, the relays."""
    kind = args[0]
    if kind == "app":
        db, plan = Path(args[1]), json.loads(Path(args[2]).read_text())
        con = sqlite3.connect(db, timeout=60, isolation_level=None)
        con.execute("PRAGMA synchronous=NORMAL")
        t = time.perf_counter()
        changes = 0
        for tx in plan:
            con.execute("BEGIN IMMEDIATE")
            for sql, rows in tx:
                changes += con.executemany(sql, rows).rowcount
            con.execute("COMMIT")
        print(json.dumps({"seconds": time.perf_counter() - t, "transactions": len(plan), "rows": changes}))
        return 0
    if kind == "engine":
        print(json.dumps(engine(Path(args[1]), Path(args[2]), args[3] == "wire")))
        return 0
    if kind == "plain":
        print(json.dumps(plain(Path(args[1]), json.loads(Path(args[2]).read_text()))))
        return 0
    if kind == "relay":
        relay_main(json.loads(args[1]))
        return 0
    raise SystemExit(f"unknown child {kind}")


def engine(src: Path, dst: Path, wire: bool) -> dict[str, Any]:
    """The daemon's exchange loop on two files, in this process: no daemon, no HTTP."""
    import msgpack

    from bastion.sync import service, site
    t: dict[str, float] = {"ingest": 0.0, "changes_for": 0.0, "wire": 0.0, "apply": 0.0, "vector": 0.0}
    start = time.perf_counter()
    c = time.perf_counter()
    site.ingest(str(src))
    t["ingest"] += time.perf_counter() - c
    peer = site.site_of(str(src))
    c = time.perf_counter()
    vec = site.vector(str(dst))
    t["vector"] += time.perf_counter() - c
    n = 0
    while True:
        c = time.perf_counter()
        changes = site.changes_for(str(src), vec, service.BATCH)
        t["changes_for"] += time.perf_counter() - c
        if not changes:
            break
        if wire:
            c = time.perf_counter()
            body = msgpack.packb({"batch": site.to_wire(changes)}, use_bin_type=True)
            changes = site.from_wire(msgpack.unpackb(body, raw=False)["batch"])
            t["wire"] += time.perf_counter() - c
        c = time.perf_counter()
        site.apply(str(dst), changes, None, peer=peer)
        t["apply"] += time.perf_counter() - c
        c = time.perf_counter()
        vec = site.vector(str(dst))
        t["vector"] += time.perf_counter() - c
        n += len(changes)
    return {"changes": n, "seconds": time.perf_counter() - start, "steps_s": t}


def plain(dst: Path, plan: list[list[list[Any]]]) -> dict[str, Any]:
    """The application's statements into ``dst`` in one transaction, triggers off (apsw)."""
    import apsw
    con = apsw.Connection(str(dst))
    con.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    t = time.perf_counter()
    con.execute("BEGIN IMMEDIATE")
    for tx in plan:
        for sql, rows in tx:
            con.executemany(sql, rows)
    con.execute("COMMIT")
    secs = time.perf_counter() - t
    con.close()
    return {"seconds": secs}


# -- the partition ----------------------------------------------------------------------------

def relay_main(links: dict[str, list[int]]) -> None:
    """Relays: per link name, [listen port, target port] on 127.0.0.1. Reads `cut NAMES` /
    `heal NAMES` lines on stdin, answers `ok` (or `error ...`) on stdout."""
    relays = {n: Relay(p, t) for n, (p, t) in links.items()}
    print("ready", flush=True)
    while line := sys.stdin.readline():
        cmd, _, names = line.strip().partition(" ")
        try:
            for n in names.split(","):
                getattr(relays[n], cmd)()
            print("ok", flush=True)
        except Exception as exc:  # told to the bench, which stops
            print(f"error {type(exc).__name__}: {exc}", flush=True)


class Relay:
    """A TCP relay to one site. Cut: the listener closes (new connections refused) and open
    connections are reset; heal: it listens again on the same port."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.srv: socket.socket | None = None
        self.heal()

    def heal(self) -> None:
        if self.srv is not None:
            return
        self.srv = socket.create_server(("127.0.0.1", self.port), backlog=64)
        threading.Thread(target=self._accept, args=(self.srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            with self.lock:
                if self.srv is not srv:           # cut meanwhile
                    c.close()
                    u.close()
                    return
                for s in (c, u):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # no Nagle delay in the path
                    self.socks.append(s)
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        with self.lock:
            srv, self.srv = self.srv, None
            socks, self.socks = self.socks, []
        if srv is not None:
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)       # wakes the accept()
            srv.close()
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                s.close()
            except OSError:
                pass


class RelayNet:
    """Every direction between sites through its own relay (a child process)."""
    kind = "relay: RST / connection refused"

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.ports = {n: free_port() for n in names}
        self.links = {f"{s}>{d}": [free_port(), self.ports[d]] for s in names for d in names if s != d}
        self.proc = subprocess.Popen([PY, __file__, "--child", "relay", json.dumps(self.links)], env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise Broken("the relay process did not start")

    def listen(self, n: str) -> str:
        return f"127.0.0.1:{self.ports[n]}"

    def sites(self, n: str) -> dict[str, str]:
        """The group as site n sees it: every other site through the relay of that direction."""
        return {m: (f"http://127.0.0.1:{self.ports[m]}" if m == n else f"http://127.0.0.1:{self.links[f'{n}>{m}'][0]}")
                for m in self.names}

    def wrap(self, n: str) -> list[str]:
        return []

    def _say(self, cmd: str, names: list[str]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{cmd} {','.join(names)}\n")
        self.proc.stdin.flush()
        ans = self.proc.stdout.readline().strip()
        if ans != "ok":
            raise Broken(f"relay {cmd}: {ans}")

    def _of(self, n: str) -> list[str]:
        return [k for k in self.links if n in k.split(">")]

    def cut(self, n: str) -> None:
        self._say("cut", self._of(n))

    def heal(self, n: str) -> None:
        self._say("heal", self._of(n))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and p.returncode:
        raise Broken(f"ip {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return p


class NsNet:
    """One network namespace per site, each on a veth pair to a bridge in the root namespace
    (10.124.S.0/24). The cut sets the root end of the site's veth down: its packets vanish."""
    kind = "netns: packets dropped (veth down)"

    def __init__(self, names: list[str]) -> None:
        if os.geteuid() != 0 or not shutil.which("ip"):
            raise Broken("--partition netns needs root and iproute2 (`ip`)")
        self.names = names
        self.tag = secrets.token_hex(3)
        self.bridge = f"bsb{self.tag}"
        used = ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout
        free = [s for s in range(1, 255) if f"10.124.{s}." not in used]
        if not free:
            raise Broken("no free 10.124.S.0/24 subnet here")
        prefix = f"10.124.{random.choice(free)}"
        self.made: list[tuple[str, str]] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{prefix}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        self.addr, self.ns, self.veth = {}, {}, {}
        for i, n in enumerate(names):
            ns, veth, inner = f"bsn{self.tag}{n}", f"bsv{self.tag}{n}", f"bsi{self.tag}{n}"
            ip("netns", "add", ns)
            self.made.append((ns, veth))
            ip("link", "add", veth, "type", "veth", "peer", "name", inner, "netns", ns)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{prefix}.{i + 2}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            self.addr[n], self.ns[n], self.veth[n] = f"{prefix}.{i + 2}", ns, veth
        self.port = free_port()

    def listen(self, n: str) -> str:
        return f"{self.addr[n]}:{self.port}"

    def sites(self, n: str) -> dict[str, str]:
        return {m: f"http://{self.addr[m]}:{self.port}" for m in self.names}

    def wrap(self, n: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[n]]

    def cut(self, n: str) -> None:
        ip("link", "set", self.veth[n], "down")

    def heal(self, n: str) -> None:
        ip("link", "set", self.veth[n], "up")

    def close(self) -> None:
        for ns, veth in self.made:
            ip("netns", "del", ns, check=False)
            ip("link", "del", veth, check=False)
        ip("link", "del", self.bridge, check=False)


# -- 1. throughput ------------------------------------------------------------------------------

def plan_inserts(first: int, n: int, txs: int) -> list[list[list[Any]]]:
    per = -(-n // txs)
    return [[["INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)",
              [[i, f"bulk {i}", i % 1000, "x" * 20] for i in range(s, min(first + n, s + per))]]]
            for s in range(first, first + n, per)]


def plan_updates(first: int, n: int, txs: int) -> list[list[list[Any]]]:
    per = -(-n // txs)
    return [[["UPDATE items SET qty = qty + 1, note = ? WHERE id = ?",
              [["updated", i] for i in range(s, min(first + n, s + per))]]] for s in range(first, first + n, per)]


def plan_stream(first_new: int, n: int, existing: tuple[int, int], rng: random.Random) -> list[list[list[Any]]]:
    out = []
    for i in range(n):
        if i % 2 == 0:
            k = first_new + i // 2
            out.append([["INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)", [[k, f"stream {k}", i, "s"]]]])
        else:
            k = rng.randint(1, existing[0] + existing[1])       # a seeded row or a bulk one
            k = k if k <= existing[0] else 100_000 + k - existing[0]
            out.append([["UPDATE items SET qty = ?, note = 'stream' WHERE id = ?", [[i, k]]]])
    return out


def throughput(base: Path, rows: int, stream: int, out: dict[str, Any]) -> None:
    """Fills ``out`` as it goes (a failure keeps what was measured)."""
    token = base / "peer.token"
    token.write_text(secrets.token_hex(32))
    ports = {n: free_port() for n in ("a", "b")}
    sites = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    d = {n: SiteDaemon(base, n, f"127.0.0.1:{ports[n]}", sites, token, "pair", "manual") for n in ports}
    scratch = base / "scratch"
    scratch.mkdir()
    seed_file(d["a"].db, 1000)
    out["loads"] = {}
    try:
        for x in d.values():
            x.start()
        d["b"].report("sync", "run", "shop")            # b joins with a copy of a's file (capture on a from then)
        tok = (d["a"].dir / "var" / "token").read_text().strip()
        with httpx.Client(base_url=f"http://{d['a'].listen}", headers={"Authorization": f"Bearer {tok}"}) as c:
            api = []
            for _ in range(5):
                t = time.perf_counter()
                c.post("/v1/sync/run", json={"database": "shop", "timeout": 60}).raise_for_status()
                api.append(time.perf_counter() - t)
        out["empty_run_api_s"] = sorted(api)[2]
        rng = random.Random(5)
        loads = [("inserts", f"{rows:,} inserts in 5 tx", plan_inserts(100_001, rows, 5)),
                 ("updates", f"{rows:,} updates in 5 tx", plan_updates(100_001, rows, 5)),
                 ("stream", f"{stream:,} 1-row commits", plan_stream(100_001 + rows, stream, (1000, rows), rng))]
        for key, label, plan in loads:
            empty = sorted(d["a"].report("sync", "run", "shop")[0] for _ in range(3))[1]
            log(f"throughput: {label}: application on a")
            app = app_result(run_app(d["a"].db, plan, scratch))
            changes = app["rows"]
            cp = scratch / key
            cp.mkdir()
            backup_copy(d["a"].db, cp / "a.db")
            backup_copy(d["b"].db, cp / "b.db")
            shutil.copy(cp / "b.db", cp / "b-engine.db")
            log(f"throughput: {label}: `bastion sync run shop` on a")
            secs, res = d["a"].report("sync", "run", "shop")
            if res.get("sent") != changes or res.get("errors"):
                raise Broken(f"sync run sent {res.get('sent')} of {changes} changes: {res}")
            if digests(d["a"].db) != digests(d["b"].db):
                raise Broken(f"after `sync run` ({label}) b's content differs from a's")
            r: dict[str, Any] = {"label": label, "changes": changes, "app": app, "sync_run_s": secs,
                                 "empty_sync_run_s": empty, "rows_per_s": changes / secs,
                                 "rows_per_s_minus_empty": changes / max(1e-9, secs - empty)}
            # one engine run, the wire step timed apart: without it is the run minus that step
            p = subprocess.run([PY, __file__, "--child", "engine", str(cp / "a.db"), str(cp / "b-engine.db"), "wire"],
                               capture_output=True, text=True, env=ENV, timeout=600, check=False)
            if p.returncode:
                raise Broken(f"engine baseline failed: {p.stderr[-2000:]}")
            e = json.loads(p.stdout)
            if e["changes"] != changes or digests(cp / "b-engine.db") != digests(d["a"].db):
                raise Broken(f"engine baseline moved {e['changes']} of {changes} changes, or b's copy differs")
            e["seconds_without_wire"] = e["seconds"] - e["steps_s"]["wire"]
            r["engine"] = {**e, "rows_per_s": changes / e["seconds"],
                           "rows_per_s_without_wire": changes / e["seconds_without_wire"]}
            pp = scratch / f"plan-{key}.json"
            pp.write_text(json.dumps(plan))
            p = subprocess.run([PY, __file__, "--child", "plain", str(cp / "b.db"), str(pp)], capture_output=True,
                               text=True, env=ENV, timeout=600, check=False)
            if p.returncode:
                raise Broken(f"plain baseline failed: {p.stderr[-2000:]}")
            r["plain"] = json.loads(p.stdout)
            r["plain"]["rows_per_s"] = changes / r["plain"]["seconds"]
            out["loads"][key] = r
            shutil.rmtree(cp)
        for n, x in d.items():
            if (v := integrity(x.db)) != "ok":
                raise Broken(f"site {n}: integrity_check: {v}")
    finally:
        for x in d.values():
            x.stop()


# -- 2. convergence after a partition -------------------------------------------------------------

def layout(changes: int, reps: int) -> dict[str, Any]:
    """Where each kind of change lands, for every repetition (ids of items seeded at a)."""
    q = changes // 3 + 1
    hot, ndel, inserts = round(q * 0.18), round(q * 0.03), round(q * 0.3)
    band = q - inserts                                    # a site's own upserts fit in its band
    dels = hot + 1                                        # c deletes, a updates: fresh rows each repetition
    own = dels + ndel * reps
    return {"hot": hot, "ndel": ndel, "inserts": inserts, "dels": dels,
            "own": {n: own + i * band for i, n in enumerate("abc")}, "seed": own + 3 * band}


def quotas(changes: int) -> dict[str, int]:
    return {"a": changes - 2 * (changes * 33 // 100), "b": changes * 33 // 100, "c": changes * 33 // 100}


def plan_partition(site: str, rep: int, quota: int, lay: dict[str, Any],
                   rng: random.Random) -> tuple[list[list[list[Any]]], int]:
    """``quota`` changes of one site during the partition (see the module's docstring)."""
    ops: list[list[Any]] = []
    tag = f"{site} r{rep}"
    for k in range(1, lay["hot"] + 1):
        ops.append([UPSERT, [k, f"item {k}", rng.randint(0, 10**6), tag]])
    dels = range(lay["dels"] + lay["ndel"] * rep, lay["dels"] + lay["ndel"] * (rep + 1))
    if site == "a":
        ops += [[UPSERT, [k, f"item {k}", rng.randint(0, 10**6), tag]] for k in dels]
    if site == "c":
        ops += [["DELETE FROM items WHERE id = ?", [k]] for k in dels]
    inserts = lay["inserts"]
    own = quota - len(ops) - inserts
    ops += [[UPSERT, [k, f"item {k}", rng.randint(0, 10**6), tag]]
            for k in range(lay["own"][site], lay["own"][site] + own)]
    first = 10_000_000 + (rep * 3 + "abc".index(site)) * 1_000_000
    ops += [["INSERT INTO items(id, name, qty, note) VALUES (?, ?, ?, ?)", [first + i, f"new {tag}", i, tag]]
            for i in range(inserts // 2)]
    ops += [["INSERT INTO events(id, item, kind, at) VALUES (?, ?, ?, ?)", [first + i, i, tag, float(i)]]
            for i in range(inserts - inserts // 2)]
    rng.shuffle(ops)
    plan = [[[sql, [row]] for sql, row in ops[i:i + TX_CHANGES]] for i in range(0, len(ops), TX_CHANGES)]
    return plan, len(ops)


def wait_for(pred, timeout: float, what: str, every: float = 0.05) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise Broken(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - t0


def heal_timeline(d: dict[str, Daemon], sites: dict[str, dict[str, str]], t0: float, t1: float) -> dict[str, Any]:
    """From the daemons' logs (httpx logs every request it got an answer to, at INFO, with ms
    timestamps): per direction, the batches (apply requests) answered between t0 and t1 (wall
    clock) and when the first and last were answered, in seconds after t0."""
    from datetime import datetime
    out: dict[str, Any] = {}
    for n, x in d.items():
        by_url = {u.split("//", 1)[1]: p for p, u in sites[n].items()}
        for line in (x.dir / "daemon.log").read_text().splitlines():
            if "HTTP Request: POST" not in line or "/v1/peer/sync/" not in line:
                continue
            try:
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if not t0 <= at <= t1:
                continue
            url = line.split("POST http://", 1)[1].split(" ", 1)[0]
            peer = by_url.get(url.split("/", 1)[0], "?")
            k = f"{n}>{peer}"
            e = out.setdefault(k, {"batches": 0, "first_answer_s": None, "last_batch_s": None})
            if e["first_answer_s"] is None:
                e["first_answer_s"] = round(at - t0, 3)
            if url.endswith("/apply"):
                e["batches"] += 1
                e["last_batch_s"] = round(at - t0, 3)
    return dict(sorted(out.items()))


def probe(a: Path, b: Path, rep: int) -> float:
    """Two rows written at a, 0.5 s apart, while c is cut off: seconds from the second commit until
    b holds it. Written from this process (stdlib sqlite3, as an application; it holds no other
    connection to the file meanwhile)."""
    ids = [-(2 * rep + 1), -(2 * rep + 2)]
    for i in ids:
        con = sqlite3.connect(a, timeout=30)
        con.execute("INSERT INTO events(id, item, kind, at) VALUES (?, 0, 'probe', ?)", (i, time.time()))
        con.commit()
        con.close()
        t = time.monotonic()
        if i == ids[0]:
            time.sleep(0.5)

    def there() -> bool:
        con = ro(b)
        try:
            return con.execute("SELECT 1 FROM events WHERE id = ?", (ids[1],)).fetchone() is not None
        finally:
            con.close()
    wait_for(there, 120, "a probe row written at a reaching b during the partition", 0.01)
    return round(time.monotonic() - t, 3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    tck = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tck, sum(v) / tck


def same_content(dbs: list[Path]) -> bool:
    ds = [digests(p) for p in dbs]
    return all(x == ds[0] for x in ds)


RATE = 50
_VENV_PYSPY = Path(PY).parent / "py-spy"
PYSPY = str(_VENV_PYSPY) if _VENV_PYSPY.exists() else (shutil.which("py-spy") or "py-spy")


class Profiler:
    """py-spy on every daemon, raw folded stacks (it costs CPU: the heal is slower under it)."""

    def __init__(self, d: dict[str, Daemon], where: Path) -> None:
        self.procs = {}
        self.files = {}
        for n, x in d.items():
            self.files[n] = where / f"pyspy-{n}.txt"
            self.procs[n] = subprocess.Popen([PYSPY, "record", "-p", str(x.pid), "-r", str(RATE), "-f", "raw",
                                              "-t", "-o", str(self.files[n])],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)       # py-spy attaches

    def stop(self) -> dict[str, Any]:
        out = {}
        for n, p in self.procs.items():
            p.send_signal(signal.SIGINT)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
            out[n] = summarise_stacks(self.files[n])
        return out


def _frame(f: str) -> str:
    """'func (bastion/sync/site.py:12)' -> 'func sync/site.py'."""
    return f.split(" (")[0] + " " + f.split(" (")[-1].split(":")[0].replace("bastion/", "")


def summarise_stacks(path: Path, top: int = 10) -> dict[str, Any]:
    """py-spy records busy samples only (not threads waiting). Per sample: its thread (the event
    loop, the syncer's pass loop, a request worker) and the innermost Bastion function on its
    stack (with the function it was in when that was Bastion's own code), counted."""
    if not path.exists():
        return {"error": "py-spy wrote nothing"}
    threads: dict[str, int] = {}
    where: dict[str, int] = {}
    leaf: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1]
        kind = ("pass loop" if name.startswith("bastion-sync") else "request worker" if "AnyIO" in name
                else "event loop" if "uvicorn" in stack or "asyncio" in stack else name)
        samples += n
        threads[kind] = threads.get(kind, 0) + n
        ours = [f for f in frames[1:] if "(bastion/" in f and "__main__" not in f and "cli.py" not in f
                and "server.py" not in f]
        key = f"{kind}: " + (_frame(ours[-1]) if ours else "(not in Bastion: " + _frame(frames[-1]) + ")")
        where[key] = where.get(key, 0) + n
        leaf[_frame(frames[-1])] = leaf.get(_frame(frames[-1]), 0) + n
    def rank(d: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(d.items(), key=lambda kv: -kv[1])[:top]
    return {"busy_samples": samples, "threads": threads, "innermost_bastion": rank(where), "leaf": rank(leaf)}


def convergence(base: Path, net_kind: str, changes: int, reps: int, profile: bool, out: dict[str, Any],
                hold: float = 0.0, writers: str = "abc", with_probe: bool = True) -> None:
    """Fills ``out`` as it goes (a failure keeps what was measured). ``hold``: c stays cut off at
    least this long; ``writers``: the sites whose applications write during the partition."""
    names = ["a", "b", "c"]
    net: RelayNet | NsNet = RelayNet(names) if net_kind == "relay" else NsNet(names)
    token = base / "peer.token"
    token.write_text(secrets.token_hex(32))
    d = {n: SiteDaemon(base, n, net.listen(n), net.sites(n), token, "mesh", "continuous", net.wrap(n)) for n in names}
    dbs = [d[n].db for n in names]
    scratch = base / "scratch"
    scratch.mkdir()
    lay = layout(changes, reps)
    seed_file(d["a"].db, lay["seed"])
    out.update(partition=net.kind, changes_per_rep=changes, hold_s=hold, writers=writers, reps=[])
    try:
        for n in names:
            d[n].start()
        log("convergence: b and c join (continuous schedule)")
        wait_for(lambda: all(x.db.exists() for x in d.values()), 60, "b and c joining")
        wait_for(lambda: same_content(dbs), 60, "the three sites agreeing after the join", 0.2)
        seen_conflicts: dict[str, int] = {}
        for rep in range(reps):
            r: dict[str, Any] = {"rep": rep + 1}
            out["reps"].append(r)
            net.cut("c")
            t_cut = time.monotonic()
            rng = random.Random(100 + rep)
            q = quotas(changes)
            plans = {n: plan_partition(n, rep, q[n], lay, rng) for n in writers}
            log(f"convergence rep {rep + 1}: c cut off ({net.kind}); {sum(p[1] for p in plans.values()):,} "
                "changes at a, b and c")
            r["probe_a_to_b_s"] = probe(d["a"].db, d["b"].db, rep) if with_probe else None
            procs = {n: run_app(d[n].db, plans[n][0], scratch) for n in writers}
            r["app"] = {n: app_result(p) for n, p in procs.items()}
            r["made"] = {n: r["app"][n]["rows"] if n in r["app"] else 0 for n in names}
            r["a_b_agree_after_s"] = round(wait_for(lambda: same_content(dbs[:2]), 120, "a and b agreeing", 0.1), 3)
            time.sleep(max(0.0, max(1.0, hold) - (time.monotonic() - t_cut)))
            vecs = {n: held(d[n].db) for n in names}
            r["partition_s"] = round(time.monotonic() - t_cut, 2)
            r["pending"] = {"lacks": lacking(vecs), "not_ingested": {n: v["_not_ingested"] for n, v in vecs.items()}}
            st = {n: d[n].report("sync", "status", "shop", ok=(0, 1), timeout=60)[1]["databases"][0] for n in names}
            r["state_before_heal"] = {n: x["state"] for n, x in st.items()}
            sent_before = {n: {p: v["sent"] for p, v in x["peers"].items()} for n, x in st.items()}
            if "c" in writers and same_content(dbs):
                raise Broken("c holds the same content as a and b while cut off: the partition did not happen")
            prof = Profiler(d, base) if profile and rep == 0 else None
            log(f"convergence rep {rep + 1}: heal; pending {r['pending']['lacks']}")
            cpu0 = {n: cpu_seconds(d[n].pid) for n in names}
            mine0, box0 = time.process_time(), machine_cpu()
            net.heal("c")
            t0 = time.monotonic()
            wall0 = time.time()
            timeline: dict[str, float] = {}
            content: tuple[float, float] | None = None      # (last poll that differed, first that agreed)
            all_held = None
            last_check = not_yet = 0.0
            watch = {n: ro(d[n].db) for n in names}
            while time.monotonic() - t0 < 120 and (content is None or all_held is None):
                now = time.monotonic() - t0
                lack = lacking({n: held(watch[n]) for n in names})
                for n in names:
                    if lack[n] == 0 and n not in timeline:
                        timeline[n] = round(now, 3)
                full = all(v == 0 for v in lack.values())
                if full and all_held is None:
                    all_held = now
                # Digests cost ~35 ms of CPU per file: taken as soon as every site holds every
                # change, and every 0.5 s before that (content may agree earlier: a change a site
                # lacks may be one that lost everywhere).
                if content is None and (full or now - last_check >= 0.5):
                    start = time.monotonic() - t0
                    if same_content(dbs):
                        content = (not_yet, time.monotonic() - t0)
                    else:
                        not_yet = start
                    last_check = start
                time.sleep(0.01)
            box1 = machine_cpu()
            for con in watch.values():
                con.close()
            r["cpu_during_heal_s"] = {**{n: round(cpu_seconds(d[n].pid) - cpu0[n], 2) for n in names},
                                      "bench": round(time.process_time() - mine0, 2),
                                      "machine_busy": round(box1[0] - box0[0], 2),
                                      "machine_total": round(box1[1] - box0[1], 2)}
            if prof is not None:
                time.sleep(0.5)
                out["profile_first_heal"] = prof.stop()
            r["holds_everything_at_s"] = timeline
            r["heal_requests"] = heal_timeline(d, {n: net.sites(n) for n in names}, wall0, time.time())
            r["converge_s"] = None if content is None else round(content[1], 3)
            r["converge_after_s"] = None if content is None else round(content[0], 3)
            r["all_changes_everywhere_s"] = None if all_held is None else round(all_held, 3)
            if content is None:
                raise Broken(f"rep {rep + 1}: the three sites did not hold the same content within 120 s of healing")
            if all_held is None:
                raise Broken(f"rep {rep + 1}: some changes did not reach every site within 120 s of healing "
                             f"(the content agreed after {content[1]:.2f} s)")
            time.sleep(0.5)
            rows = [dump(p) for p in dbs]
            if not rows[0] == rows[1] == rows[2]:
                raise Broken(f"rep {rep + 1}: content differs between sites 0.5 s after converging")
            checks = {n: integrity(d[n].db) for n in names}
            if any(v != "ok" for v in checks.values()):
                raise Broken(f"rep {rep + 1}: integrity_check: {checks}")
            r["integrity"] = checks
            r["rows"] = {t: len(v) for t, v in rows[0].items()}
            total = {n: len(d[n].report("conflicts", "list", "shop", timeout=60)[1]["conflicts"]) for n in names}
            r["conflicts_recorded"] = {n: total[n] - seen_conflicts.get(n, 0) for n in names}
            seen_conflicts = total
            st = {n: d[n].report("sync", "status", "shop", ok=(0, 1), timeout=60)[1]["databases"][0] for n in names}
            r["sent_during_heal"] = {n: {p: v["sent"] - sent_before[n].get(p, 0) for p, v in x["peers"].items()}
                                     for n, x in st.items()}
            log(f"convergence rep {rep + 1}: same content after {r['converge_after_s']}-{r['converge_s']} s; every "
                f"change everywhere after {r['all_changes_everywhere_s']} s; per site {timeline}")
        out["logs"] = {n: [ln for ln in (d[n].dir / "daemon.log").read_text().splitlines() if "WARNING" in ln][-8:]
                       for n in names}
    finally:
        for x in d.values():
            x.stop()
        net.close()


# -- report ---------------------------------------------------------------------------------------

def table(head: list[str], rows: list[list[str]]) -> None:
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip()
    print(line(head))
    print(line(["-" * x for x in w]))
    for r in rows:
        print(line(r))


# -- 3. the bank ----------------------------------------------------------------------------------

BANK_ACCOUNTS = 20


def bank_rows(d: Path) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(accounts, meta, audit rows as what they record: their keys may have moved)."""
    con = ro(d / "bank.db")
    try:
        acc = con.execute("SELECT * FROM accounts ORDER BY id").fetchall()
        meta = con.execute("SELECT * FROM meta ORDER BY key").fetchall()
    finally:
        con.close()
    con = ro(d / "audit.db")
    try:
        audit = sorted(con.execute("SELECT src, dst, amount, at FROM audit").fetchall())
    finally:
        con.close()
    return acc, meta, audit


class BankDaemon(Daemon):
    """A site's daemon for the bank; ``wrap``: a prefix for the command (ip netns exec NS)."""

    def __init__(self, config: Path, port: int, addr: str, wrap: list[str]) -> None:
        super().__init__(config, port)
        self.addr, self.wrap = addr, wrap

    def command(self) -> list[str]:
        return [*self.wrap, *super().command()]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def bank(base: Path, net_kind: str, seconds: float, out: dict[str, Any]) -> None:
    from collections import Counter

    from bastion import workload
    names = ["a", "b", "c"]
    net: RelayNet | NsNet = RelayNet(names) if net_kind == "relay" else NsNet(names)
    token = base / "peer.token"
    token.write_text(secrets.token_hex(32))
    d: dict[str, BankDaemon] = {}
    for n in names:
        (base / n).mkdir()
        addr, port = net.listen(n).rsplit(":", 1)
        cfg = write_config(base / n, int(port), {"bank": {"files": [base / n / "bank.db", base / n / "audit.db"],
                                                          "sync_group": "g"}}, addr=addr, sections={
            "replication": {"peer_token_file": token}, "sync": {"site": n},
            "sync_groups.g": {"sites": net.sites(n), "topology": "mesh", "schedule": "continuous",
                              "counters": ["accounts.balance", "meta.value"]}})
        d[n] = BankDaemon(cfg, int(port), addr, net.wrap(n))
    workload.init(str(base / "a"), BANK_ACCOUNTS)
    for f in ("bank.db", "audit.db"):
        sqlite3.connect(base / "a" / f).execute("PRAGMA journal_mode = WAL").fetchall()
    files = [base / n / f for n in names for f in ("bank.db", "audit.db")]
    out.update(partition=net.kind, seconds=seconds)
    cut = False
    try:
        for n in names:
            d[n].start()
        log("bank: b and c join")
        wait_for(lambda: all(p.exists() for p in files), 120, "b and c joining")
        wait_for(lambda: same_content(files[0::2]) and same_content(files[1::2]), 120, "the sites agreeing", 0.2)
        for n in names:
            net.cut(n)
        cut = True
        log(f"bank: every site cut off; the bank runs {seconds:g} s at each")
        procs = {n: subprocess.Popen([*net.wrap(n), PY, "-m", "bastion.workload", "run", str(base / n), "--seconds",
                                      str(seconds), "--rate", "150", "--stats", str(base / n / "stats.json")],
                                     env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for n in names}
        for n, p in procs.items():
            _, err = p.communicate(timeout=seconds + 300)
            if p.returncode:
                raise Broken(f"the bank at {n} exited {p.returncode}: {err[-2000:]}")
        commits = {n: json.loads((base / n / "stats.json").read_text())["commits"] for n in names}
        want = sum((Counter(bank_rows(base / n)[2]) for n in names), Counter())
        out["transfers"] = commits
        cpu0 = {n: cpu_seconds(d[n].pid) for n in names}

        def sent() -> int:
            st = [json.loads(subprocess.run([*net.wrap(n), PY, "-m", "bastion", "--config", str(d[n].config), "sync",
                                             "status", "bank", "--json"], capture_output=True, text=True, timeout=60,
                                            env=ENV, check=False).stdout)["databases"][0] for n in names]
            return sum(v["sent"] for x in st for v in x["peers"].values())
        sent0 = sent()
        log(f"bank: heal after {sum(commits.values()):,} transfers")
        for n in names:
            net.heal(n)
        cut = False

        def converged() -> bool:
            return all(held(base / n / f) == held(base / "a" / f) for n in names for f in ("bank.db", "audit.db")) \
                and same_content(files[0::2]) and same_content(files[1::2])
        out["converged_s"] = round(wait_for(converged, 600, "the three sites converging", 0.05), 2)
        out["cpu_s"] = {n: round(cpu_seconds(d[n].pid) - cpu0[n], 2) for n in names}
        # Each change must reach the two other sites once: more is changes sent twice (skipped there).
        out["sent"], out["needed"] = sent() - sent0, 2 * 4 * sum(commits.values())
        lost = doubled = 0
        for n in names:
            acc, meta, audit = bank_rows(base / n)
            got = Counter(audit)
            lost, doubled = max(lost, sum((want - got).values())), max(doubled, sum((got - want).values()))
            if sum(r[2] for r in acc) != BANK_ACCOUNTS * workload.BALANCE:
                out["money"] = f"site {n}: total balance {sum(r[2] for r in acc)}"
            if dict(meta)["transfers"] != sum(commits.values()) or len(audit) != sum(commits.values()):
                out["transfer_count"] = f"site {n}: {dict(meta)['transfers']} transfers, {len(audit)} audit rows"
            for f in ("bank.db", "audit.db"):
                if integrity(base / n / f) != "ok":
                    out["integrity"] = f"{n}/{f}: {integrity(base / n / f)}"
        out.update(lost_rows=lost, doubled_rows=doubled)
        out.setdefault("money", "conserved")
        if lost or doubled or out["money"] != "conserved" or "transfer_count" in out or "integrity" in out:
            raise Broken(f"the bank lost or changed data: {out}")
    finally:
        if cut:
            for n in names:
                net.heal(n)
        for x in d.values():
            x.stop()
        net.close()


def report(res: dict[str, Any]) -> None:
    ls, le = res["loadavg_start"], res.get("loadavg_end") or [float("nan")] * 3
    print(f"load average {ls[0]:.2f} {ls[1]:.2f} {ls[2]:.2f} at start, {le[0]:.2f} {le[1]:.2f} {le[2]:.2f} at end "
          f"({os.cpu_count()} cores, shared)")
    tp = res.get("throughput")
    if tp and tp.get("loads"):
        loads = tp["loads"]
        print(f"\n1. sync throughput, changes/s (a -> b, pair, schedule manual); a sync run with nothing to send "
              f"takes {tp['empty_run_api_s'] * 1000:.0f} ms through the API")
        head = ["measure"] + [r["label"] for r in loads.values()]
        rows = [["`bastion sync run` on a (CLI): ingest+read+msgpack+HTTP+apply"]
                + [f"{r['rows_per_s']:,.0f} ({r['sync_run_s']:.2f} s)" for r in loads.values()],
                ["  minus an empty `sync run` (CLI start-up: s)"]
                + [f"{r['rows_per_s_minus_empty']:,.0f} ({r['empty_sync_run_s']:.2f})" for r in loads.values()],
                ["engine in process, no HTTP, no msgpack"]
                + [f"{r['changes'] / r['engine']['seconds_without_wire']:,.0f} "
                   f"({r['engine']['seconds_without_wire']:.2f} s)" for r in loads.values()],
                ["  of which ingest / changes_for / apply+vector (s)"]
                + [f"{r['engine']['steps_s']['ingest']:.2f} / {r['engine']['steps_s']['changes_for']:.2f} / "
                   f"{r['engine']['steps_s']['apply'] + r['engine']['steps_s']['vector']:.2f}" for r in loads.values()],
                ["engine + to_wire/msgpack/from_wire (no HTTP)"]
                + [f"{r['engine']['rows_per_s']:,.0f} ({r['engine']['seconds']:.2f} s)" for r in loads.values()],
                ["plain: app's statements into b's copy, 1 tx, no triggers"]
                + [f"{r['plain']['rows_per_s']:,.0f} ({r['plain']['seconds']:.2f} s)" for r in loads.values()],
                ["sync run, times slower than plain / than engine+wire"]
                + [f"{r['plain']['rows_per_s'] / r['rows_per_s']:.0f} / "
                   f"{r['engine']['rows_per_s'] / r['rows_per_s']:.1f}" for r in loads.values()],
                ["application's own rate with capture (info)"]
                + [f"{r['changes'] / r['app']['seconds']:,.0f}" for r in loads.values()]]
        table(head, rows)
    cv = res.get("convergence")
    if cv and cv.get("reps") and "converge_s" in cv["reps"][0]:
        print(f"\n2. convergence after a partition of c: a, b, c in a mesh, schedule continuous, "
              f"{cv['changes_per_rep']:,} changes per repetition; partition: {cv['partition']}")
        head = ["rep", "a->b while cut s", "made a/b/c", "cut s", "lacks at heal a/b/c", "c not ingested",
                "same content s", "goal < 2 s", "all changes everywhere s (a/b/c)", "sent in heal", "conflicts a/b/c",
                "integrity"]
        rows = []
        for r in cv["reps"]:
            if r.get("converge_s") is None or "integrity" not in r:
                continue
            t = r["holds_everything_at_s"]
            probe_s = "-" if r["probe_a_to_b_s"] is None else f"{r['probe_a_to_b_s']:.2f}"
            rows.append([str(r["rep"]), probe_s, "/".join(str(r["made"][n]) for n in "abc"), f"{r['partition_s']:.1f}",
                         "/".join(str(r["pending"]["lacks"][n]) for n in "abc"),
                         str(r["pending"]["not_ingested"]["c"]),
                         f"{r['converge_after_s']:.2f}-{r['converge_s']:.2f}",
                         "PASS" if r["converge_s"] < 2 else "MISS",
                         f"{r['all_changes_everywhere_s']:.2f} ("
                         + "/".join(f"{t.get(n, float('nan')):.2f}" for n in "abc") + ")",
                         f"{sum(v for x in r['sent_during_heal'].values() for v in x.values()):,}",
                         "/".join(str(r["conflicts_recorded"][n]) for n in "abc"),
                         "ok" if all(v == "ok" for v in r["integrity"].values()) else "FAIL"])
        table(head, rows)
        for r in cv["reps"]:
            c = r.get("cpu_during_heal_s")
            if c:
                print(f"rep {r['rep']} CPU seconds from heal to the end of polling: daemons a {c['a']}, b {c['b']}, "
                      f"c {c['c']}; this bench's polling {c['bench']}; whole machine {c['machine_busy']} of "
                      f"{c['machine_total']} ({100 * c['machine_busy'] / max(c['machine_total'], 1e-9):.0f} % busy)")
            if r.get("heal_requests"):
                print(f"rep {r['rep']} after healing, per direction: batches, first answer .. last batch (s): "
                      + "; ".join(f"{k} {v['batches']}, {v['first_answer_s']}..{v['last_batch_s']}"
                                  for k, v in r["heal_requests"].items()))
        if cv["reps"]:
            st = cv["reps"][-1]["state_before_heal"]
            print("state before healing (last rep): " + "; ".join(f"{n}: {s}" for n, s in st.items()))
        for n, p in (cv.get("profile_first_heal") or {}).items():
            if "threads" in p:
                print(f"py-spy, site {n}, first heal ({p['busy_samples']} busy samples at {RATE}/s): "
                      + ", ".join(f"{k} {v}" for k, v in p["threads"].items()))
                for k, v in p["innermost_bastion"][:6]:
                    print(f"    {v:5d}  {k}")
    bk = res.get("bank")
    if bk and "converged_s" in bk:
        t = bk["converged_s"]
        print(f"\n3. the bank at 3 sites, all cut off {bk['seconds']:g} s ({bk['partition']}), "
              f"{sum(bk['transfers'].values()):,} transfers: converged {t:.2f} s after the heal "
              f"({'ok' if t < 2 else 'MISS'}, goal < 2 s); daemons' CPU meanwhile "
              + ", ".join(f"{n} {c:.1f} s" for n, c in bk["cpu_s"].items())
              + f"; changes sent {bk.get('sent', 0):,} for {bk.get('needed', 0):,} needed"
              + f"; audit rows lost {bk.get('lost_rows')}, doubled {bk.get('doubled_rows')}; money {bk.get('money')}")
    if res.get("error"):
        print(f"\nBROKEN: {res['error']}")
    print(f"wrote {OUT / 'sync.json'}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000, help="rows inserted then updated (default 50000)")
    ap.add_argument("--stream", type=int, default=20_000, help="1-row commits of the stream (default 20000)")
    ap.add_argument("--changes", type=int, default=10_000, help="changes made during each partition (default 10000)")
    ap.add_argument("--reps", type=int, default=3, help="partition repetitions (default 3)")
    ap.add_argument("--partition", choices=["relay", "netns"], default="relay", help="how c is cut off (see above)")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="keep c cut off at least this many seconds (default: until a and b agree, 1 s at least)")
    ap.add_argument("--writers", default="abc", help="sites whose applications write during the partition "
                    "(default abc; the changes per site stay those of the default split)")
    ap.add_argument("--no-probe", action="store_true", help="no probe rows at a during the partition (then "
                    "with --writers c, nothing wakes c when the partition heals)")
    ap.add_argument("--bank-seconds", type=float, default=30.0,
                    help="how long the bank runs at each site while they are cut off (default 30)")
    ap.add_argument("--skip", choices=["throughput", "convergence", "bank"], action="append", default=[],
                    help="skip a part (repeatable)")
    ap.add_argument("--profile", action="store_true", help="py-spy every daemon during the first heal")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    res: dict[str, Any] = {"args": vars(args), "loadavg_start": os.getloadavg(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    code = 0
    try:
        if "throughput" not in args.skip:
            (base / "tp").mkdir()
            throughput(base / "tp", args.rows, args.stream, res.setdefault("throughput", {}))
        if "convergence" not in args.skip:
            (base / "cv").mkdir()
            convergence(base / "cv", args.partition, args.changes, args.reps, args.profile,
                        res.setdefault("convergence", {}), args.hold, args.writers, not args.no_probe)
        if "bank" not in args.skip:
            (base / "bank").mkdir()
            bank(base / "bank", args.partition, args.bank_seconds, res.setdefault("bank", {}))
    except Broken as exc:
        res["error"] = str(exc)
        code = 1
    finally:
        if args.keep or args.profile or code:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sync.json").write_text(json.dumps(res, indent=2, default=str))
    report(res)
    return code


if __name__ == "__main__":
    sys.exit(main())
