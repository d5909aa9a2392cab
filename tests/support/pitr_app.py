"""An application for the point-in-time tests: writes with its own SQLite (stdlib) in its own process.

Every transaction is a deterministic function of its number (seeded), so the content after the
first k transactions can be rebuilt anywhere (:func:`expected`); each commit's wall-clock time is
logged as ``k time`` once commit() returned. Bursts of transactions alternate with pauses, so the
tests can pick instants at which the committed content is beyond doubt. Options: checkpoints of
the application's own (TRUNCATE / RESTART) every N transactions."""

from __future__ import annotations

import random
import sqlite3
import sys
import time

SCHEMA = ("CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, v TEXT, n INTEGER);"
          "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER);"
          "INSERT OR IGNORE INTO meta VALUES('txn', 0)")


def init(path: str) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    con.commit()
    con.close()


def apply(con: sqlite3.Connection, k: int) -> None:
    """Transaction number k (1-based): inserts, updates and sometimes a delete or a big row."""
    rng = random.Random(k)
    for _ in range(rng.randint(1, 3)):
        con.execute("INSERT INTO items(v, n) VALUES(?, ?)", (f"row{k}-{rng.random():.6f}", k))
    if k > 5:
        con.execute("UPDATE items SET n = n + ? WHERE id = ?", (k, rng.randint(1, k)))
    if k % 37 == 0:
        con.execute("DELETE FROM items WHERE id = ?", (rng.randint(1, k),))
    if k % 50 == 0:
        con.execute("INSERT INTO items(v, n) VALUES(?, ?)", ("x" * rng.randint(3000, 20000), -k))
    con.execute("UPDATE meta SET v = ? WHERE k = 'txn'", (k,))


def content(con: sqlite3.Connection) -> list[tuple]:
    return con.execute("SELECT id, v, n FROM items ORDER BY id").fetchall()


def expected(k: int) -> list[tuple]:
    con = sqlite3.connect(":memory:")
    con.executescript(SCHEMA)
    for i in range(1, k + 1):
        apply(con, i)
    return content(con)


def main() -> None:
    path, log, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ckpt_every = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    con = sqlite3.connect(path, isolation_level=None, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    k = con.execute("SELECT v FROM meta WHERE k='txn'").fetchone()[0]
    rng = random.Random(12345)
    end = time.time() + seconds
    with open(log, "a", buffering=1) as out:
        while time.time() < end:
            for _ in range(rng.randint(5, 60)):
                k += 1
                con.execute("BEGIN IMMEDIATE")
                apply(con, k)
                con.execute("COMMIT")
                out.write(f"{k} {time.time():.6f}\n")
                if ckpt_every and k % ckpt_every == 0:
                    mode = "TRUNCATE" if (k // ckpt_every) % 2 else "RESTART"
                    r = con.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
                    out.write(f"# checkpoint {mode} {r}\n")
            time.sleep(rng.uniform(0.25, 0.4))
    con.close()


def serve() -> None:
    """Driven line by line on stdin (for the state machine): ``w N`` commits N transactions and
    answers ``k time`` of the last; ``c MODE`` runs wal_checkpoint(MODE) and answers its row."""
    path = sys.argv[2]
    con = sqlite3.connect(path, isolation_level=None, timeout=30)
    con.execute("PRAGMA busy_timeout=30000")
    k = con.execute("SELECT v FROM meta WHERE k='txn'").fetchone()[0]
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "w":
            for _ in range(int(arg)):
                k += 1
                con.execute("BEGIN IMMEDIATE")
                apply(con, k)
                con.execute("COMMIT")
            print(k, f"{time.time():.6f}", flush=True)
        else:
            print(*con.execute(f"PRAGMA wal_checkpoint({arg})").fetchone(), flush=True)
    con.close()


if __name__ == "__main__":
    serve() if sys.argv[1] == "serve" else main()
