"""The position value types: ordering, round trips through their JSON forms, vector join laws,
and clear refusals of hostile input."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.errors import BastionError, UsageError
from bastion.position import Cut, Instant, Position, Vector

seqs = st.integers(min_value=0, max_value=2**62)
positions = st.builds(Position, seqs, seqs)
origins = st.sampled_from(["a", "b", "site-3", "replica:x:/var", "é"])
vectors = st.dictionaries(origins, st.integers(min_value=0, max_value=50), max_size=5).map(Vector)
epochs = st.floats(min_value=1.0, max_value=4_000_000_000.0, allow_nan=False)

# Values that came over the wire from a peer or out of an edited file.
HOSTILE_COUNTS = [-1, -(2**70), 1.5, "3", None, True, [1], {"hlc": 1}, math.nan]


# -- Position -------------------------------------------------------------------------------

@given(positions, positions)
def test_positions_order_by_seq_alone(a: Position, b: Position) -> None:
    assert (a < b) == (a.seq < b.seq) and (a == b) == (a.seq == b.seq)
    assert (a == b) <= (hash(a) == hash(b))
    assert sorted([a, b]) == sorted([b, a], key=lambda p: p.seq) or a == b


@given(positions)
def test_position_round_trips_as_capture_wrote_it(p: Position) -> None:
    # the shape capture's status and install results have always had: {"seq": ..., "hlc": ...}
    assert json.dumps(p.to_json()) == json.dumps({"seq": p.seq, "hlc": p.hlc})
    back = Position.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p and back.hlc == p.hlc
    assert Position.from_json(p.seq) == p


def test_position_prints_in_words() -> None:
    assert str(Position(42, 7)) == "position 42"


@pytest.mark.parametrize("bad", HOSTILE_COUNTS)
def test_position_refuses_hostile_input(bad: object) -> None:
    with pytest.raises(UsageError):
        Position.from_json(bad)
    with pytest.raises(UsageError):
        Position.from_json({"seq": 3, "hlc": bad}) if bad is not None else Position.from_json({"hlc": 3})


def test_position_is_immutable() -> None:
    p = Position(1)
    with pytest.raises(AttributeError):
        p.seq = 2  # type: ignore[misc]


# -- Cut --------------------------------------------------------------------------------------

@given(st.lists(positions, min_size=1, max_size=6))
def test_cut_round_trips_in_both_wire_forms(ps: list[Position]) -> None:
    c = Cut(tuple(ps))
    assert c.to_json() == [p.seq for p in ps]                        # /v1/peer/positions, apply answers
    assert c.to_json(clock=True) == [{"seq": p.seq, "hlc": p.hlc} for p in ps]   # /v1/peer/seed/commit
    assert Cut.from_json(json.loads(json.dumps(c.to_json())), files=len(ps)) == c
    full = Cut.from_json(json.loads(json.dumps(c.to_json(clock=True))), files=len(ps))
    assert [p.hlc for p in full] == [p.hlc for p in ps]


@given(st.lists(seqs, min_size=1, max_size=5), st.lists(seqs, min_size=1, max_size=5))
def test_cut_covers_file_by_file(a: list[int], b: list[int]) -> None:
    b = (b * 5)[:len(a)]
    ca, cb = Cut.of(a), Cut.of(b)
    assert ca.covers(cb) == all(x >= y for x, y in zip(a, b))
    assert ca.covers(ca)
    if ca.covers(cb) and cb.covers(ca):
        assert ca == cb


def test_cut_is_a_partial_order_without_less_than() -> None:
    with pytest.raises(TypeError):
        assert Cut.of([1, 2]) < Cut.of([2, 3])   # type: ignore[operator]


def test_cut_refuses_wrong_file_count_and_hostile_entries() -> None:
    with pytest.raises(UsageError, match="2 files, for a database of 3"):
        Cut.from_json([1, 2], files=3)
    with pytest.raises(UsageError, match="cannot be compared"):
        Cut.of([1]).covers(Cut.of([1, 2]))
    for bad in ([], {}, "1,2", None, [1, -1], [1, "2"], [1.0], [True], [{"hlc": 3}]):
        with pytest.raises(UsageError):
            Cut.from_json(bad)


def test_held_reads_a_replica_answer() -> None:
    assert Cut.held([3, None], files=2) is None       # it holds nothing of one file: no cut
    assert Cut.held([3, 4], files=2) == Cut.of([3, 4])
    with pytest.raises(UsageError):
        Cut.held([None], files=2)
    with pytest.raises(UsageError):
        Cut.held([3, -4], files=2)


def test_cut_prints_in_words() -> None:
    assert str(Cut.of([12, 40])) == "cut 12/40"


# -- Vector -----------------------------------------------------------------------------------

@given(vectors, vectors)
def test_join_is_commutative_and_covers_both(a: Vector, b: Vector) -> None:
    j = a.join(b)
    assert j == b.join(a)
    assert j.covers(a) and j.covers(b)


@given(vectors, vectors, vectors)
def test_join_is_associative(a: Vector, b: Vector, c: Vector) -> None:
    assert a.join(b).join(c) == a.join(b.join(c))


@given(vectors, vectors)
def test_join_is_idempotent_and_least(a: Vector, b: Vector) -> None:
    assert a.join(a) == a
    assert a.join(b).join(b) == a.join(b)
    if a.covers(b):                # the least upper bound: nothing above a is needed
        assert a.join(b) == a


@given(vectors, vectors, vectors)
def test_covers_is_a_partial_order(a: Vector, b: Vector, c: Vector) -> None:
    assert a.covers(a)
    if a.covers(b) and b.covers(a):
        assert a == b and hash(a) == hash(b)
    if a.covers(b) and b.covers(c):
        assert a.covers(c)


@given(vectors, vectors)
def test_compare_agrees_with_covers(a: Vector, b: Vector) -> None:
    want = {(True, True): "equal", (True, False): "after", (False, True): "before",
            (False, False): "concurrent"}[(a.covers(b), b.covers(a))]
    assert a.compare(b) == want
    assert b.compare(a) == {"after": "before", "before": "after"}.get(want, want)


@given(vectors, vectors)
def test_lacking_counts_what_the_other_misses(a: Vector, b: Vector) -> None:
    assert a.lacking(b) == sum(max(0, n - b.get(o, 0)) for o, n in a.items())
    assert (a.lacking(b) == 0) == b.covers(a)


@given(vectors)
def test_vector_round_trips_in_the_order_it_came(v: Vector) -> None:
    raw = v.to_json()
    assert json.dumps(Vector.from_json(json.loads(json.dumps(raw))).to_json()) == json.dumps(raw)


def test_absent_origin_counts_as_zero() -> None:
    assert Vector({"a": 0}) == Vector() == {}
    assert Vector({"a": 3}) == {"a": 3, "b": 0}
    assert Vector({"a": 3}).seq("zz") == 0


def test_vector_has_no_total_order_and_is_immutable() -> None:
    a, b = Vector({"a": 2}), Vector({"b": 1})
    assert a.compare(b) == "concurrent"
    with pytest.raises(TypeError):
        assert a < b  # type: ignore[operator]
    with pytest.raises(AttributeError):
        a._d = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        a["a"] = 3  # type: ignore[index]


@pytest.mark.parametrize("bad", [[("a", 1)], "a=1", None, 3, {"": 1}, {"a": -1}, {"a": 1.0}, {"a": "1"},
                                 {"a": True}, {"a": None}, {1: 2}])
def test_vector_refuses_hostile_input(bad: object) -> None:
    with pytest.raises(UsageError) as err:
        Vector.from_json(bad)
    assert isinstance(err.value, BastionError) and err.value.exit_code == 3


def test_vector_prints_sorted() -> None:
    assert str(Vector({"b": 2, "a": 1})) == "{a: 1, b: 2}"


# -- Instant ----------------------------------------------------------------------------------

@given(epochs, epochs)
def test_instants_order_by_time_and_text_agrees(a: float, b: float) -> None:
    ia, ib = Instant(a), Instant(b)
    assert (ia < ib) == (a < b)
    if ia.iso < ib.iso:             # list and status sort manifests by their text
        assert ia < ib


@given(epochs)
def test_instant_round_trips_as_manifests_hold_it(e: float) -> None:
    i = Instant(e)
    raw = json.dumps(i.to_json())
    assert raw == json.dumps({"instant": i.iso, "instant_epoch": e})
    back = Instant.from_json(json.loads(raw))
    assert back == i and back.epoch == e


def test_instant_prints_as_bastion_prints_times() -> None:
    i = Instant(1764771307.25)
    assert str(i) == "2025-12-03T14:15:07.250Z" and i.stamp == "20251203T141507Z"


@pytest.mark.parametrize("bad", [
    {"instant": "2025-12-03T14:15:07.250Z", "instant_epoch": 1764771307.25 + 3600},   # they disagree
    {"instant": "2025-12-03 14:15:07", "instant_epoch": 1764771307.0},
    {"instant": "2025-13-03T14:15:07Z", "instant_epoch": 1764771307.0},
    {"instant": "2025-12-03T14:15:07Z", "instant_epoch": "1764771307"},
    {"instant": "2025-12-03T14:15:07Z", "instant_epoch": math.inf},
    {"instant": "2025-12-03T14:15:07Z", "instant_epoch": -5.0},
    {"instant": "2025-12-03T14:15:07Z", "instant_epoch": True},
    {"instant": "2025-12-03T14:15:07Z"}, {"instant_epoch": 1764771307.0}, "2025-12-03T14:15:07Z", None])
def test_instant_refuses_hostile_input(bad: object) -> None:
    with pytest.raises(UsageError):
        Instant.from_json(bad)


# -- at the seams: what a peer sends is checked where it comes in --------------------------------

def test_a_neighbour_answering_a_hostile_vector_is_a_named_error_not_a_crash(tmp_path) -> None:
    """A sync neighbour whose vector is not origin -> change number (broken, or hostile) is
    reported as that neighbour's error, in words; the pass goes on."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from support.daemon import DaemonProc, write_config
    from support.proc import free_port
    from support.sites import seed_file

    class Neighbour(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"database": "shop", "site": "b", "vector": ["b", 3]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass
    fake = ThreadingHTTPServer(("127.0.0.1", free_port()), Neighbour)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    token = tmp_path / "peer.token"
    token.write_text("t" * 32 + "\n")
    db = tmp_path / "shop.db"
    seed_file(db)
    port = free_port()
    cfg = write_config(tmp_path, port, {"shop": {"files": [str(db)], "sync_group": "g"}},
                       sections={"replication": {"peer_token_file": token}, "sync": {"site": "a"},
                                 "sync_groups.g": {"sites": {"a": f"http://127.0.0.1:{port}",
                                                             "b": f"http://127.0.0.1:{fake.server_port}"},
                                                   "topology": "mesh", "schedule": "continuous",
                                                   "keys": {"items": "shared"}}})
    d = DaemonProc(cfg, port, tmp_path / "var").start()
    try:
        deadline = time.monotonic() + 30
        while True:
            r = d.cli("sync", "status", "shop", "--json")
            err = (r.json or {}).get("databases", [{}])[0].get("peers", {}).get("b", {}).get("last_error") \
                if r.out else None
            if err:
                break
            assert time.monotonic() < deadline, (r.out, r.err, d.log.read_text()[-3000:] if d.log else "")
            time.sleep(0.3)
        assert "a vector must be an object of origin -> change number" in err, err
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.stop()
        fake.shutdown()
        fake.server_close()
