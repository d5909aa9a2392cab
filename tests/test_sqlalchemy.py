"""The SQLAlchemy dialect (bastion:// and bastion+dbapi://) against a real daemon in its own process.

Modelled on the ideas of SQLAlchemy's own dialect test suite: types round-trip exactly,
executemany, rowcounts, RETURNING, transactions and savepoints, reflection, the ORM,
errors wrapped in SQLAlchemy's exceptions, and a pool that survives the daemon.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import time

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy import orm
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

import bastion.client as bc
from bastion.client.sqlalchemy import BastionDialect
from bastion.sql.users import hash_password
from support import DaemonProc, check_bank, free_port, init_bank, write_config

PW = "carol-secret-3"
IDLE = 3.0      # the daemon's [sql] idle_timeout, seconds


def _start(root, port: int | None = None) -> DaemonProc:
    """A daemon serving the bank workload's files (bank.db + audit.db) as database 'bank'."""
    app = root / "app"
    if not app.exists():
        init_bank(app, 20)
    port = port or free_port()
    users = (f"[sql]\nidle_timeout = \"{IDLE:g}s\"\nbusy_timeout = \"10s\"\n\n"
             f"[users.carol]\npassword_hash = \"{hash_password(PW)}\"\naccess = {{ bank = \"read-write\" }}\n\n"
             f"[users.dave]\npassword_hash = \"{hash_password(PW)}\"\naccess = {{ bank = \"read-only\" }}\n")
    cfg = write_config(root, port, {"bank": [str(app / "bank.db"), str(app / "audit.db")]}, extra=users)
    return DaemonProc(cfg, port, root / "var").start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = _start(tmp_path_factory.mktemp("sa"))
    yield d
    d.stop()


def url(d: DaemonProc, scheme: str = "bastion", user: str = "carol", query: str = "") -> str:
    return f"{scheme}://{user}:{PW}@127.0.0.1:{d.port}/bank{query}"


@pytest.fixture
def engine(server):
    e = sa.create_engine(url(server))
    yield e
    e.dispose()


def test_url_forms_entry_points_and_failover(server):
    for scheme in ("bastion", "bastion+dbapi"):
        e = sa.create_engine(url(server, scheme))
        assert type(e.dialect) is BastionDialect and e.dialect.name == "sqlite"
        with e.connect() as c:
            assert c.scalar(sa.text("SELECT count(*) FROM accounts")) == 20
            assert c.dialect.server_version_info >= (3, 35)
        e.dispose()
    # more hosts in the query string; the first one is dead: the driver goes on to the active node
    dead = f"127.0.0.1:{free_port()}"
    e = sa.create_engine(f"bastion://carol:{PW}@{dead}/bank?host=127.0.0.1:{server.port}&failover_timeout=10")
    args, kw = e.dialect.create_connect_args(e.url)
    assert args == [f"bastion://carol@{dead},127.0.0.1:{server.port}/bank"] and kw == {
        "password": PW, "failover_timeout": 10.0}
    assert PW not in repr(e.url) and PW not in str(args)      # the password stays out of the DSN and logs
    with e.connect() as c:
        assert c.scalar(sa.text("SELECT 1")) == 1
        assert c.connection.dbapi_connection.transport.host.endswith(f":{server.port}")
    e.dispose()
    d = BastionDialect()
    args, _ = d.create_connect_args(sa.engine.make_url("bastion://u@h1,h2:9/db?hosts=h3:3,[::1]:4,h5&tls=1"))
    assert args == ["bastion://u@h1:9,h2:9,h3:3,[::1]:4,h5:8750/db?tls=1"]
    with pytest.raises(sa_exc.ArgumentError, match="unknown option 'tsl'"):
        d.create_connect_args(sa.engine.make_url("bastion://u@h/db?tsl=1"))
    with pytest.raises(sa_exc.ArgumentError, match="names no database"):
        d.create_connect_args(sa.engine.make_url("bastion://u@h"))
    # the password through connect_args, the admin token through a file named in the URL
    e = sa.create_engine(f"bastion://carol@127.0.0.1:{server.port}/bank", connect_args={"password": PW})
    with e.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM accounts")) == 20
    e.dispose()
    token_file = server.data_dir / "token"
    e = sa.create_engine(f"bastion://127.0.0.1:{server.port}/bank?token_file={token_file}")
    with e.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM accounts")) == 20
    e.dispose()
    # wrong credentials: SQLAlchemy's OperationalError around the driver's AccessDenied
    e = sa.create_engine(f"bastion://carol:nope@127.0.0.1:{server.port}/bank")
    with pytest.raises(sa_exc.OperationalError, match="credentials") as ei, e.connect() as c:
        c.execute(sa.text("SELECT 1"))
    assert isinstance(ei.value.orig, bc.AccessDenied)
    e.dispose()


class Mood(enum.Enum):
    happy = "happy"
    sad = "sad"


def test_column_types_round_trip_exactly(engine):
    md = sa.MetaData()
    t = sa.Table(
        "sa_types", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("big", sa.BigInteger), sa.Column("s", sa.String(50)), sa.Column("txt", sa.Text),
        sa.Column("u", sa.Unicode(40)), sa.Column("blob", sa.LargeBinary), sa.Column("f", sa.Float),
        sa.Column("num", sa.Numeric(12, 4)), sa.Column("flag", sa.Boolean),
        sa.Column("d", sa.Date), sa.Column("dt", sa.DateTime), sa.Column("tm", sa.Time),
        sa.Column("doc", sa.JSON), sa.Column("mood", sa.Enum(Mood)),
        sa.Column("ts", sa.DateTime, server_default=sa.func.current_timestamp()),
    )
    md.create_all(engine)
    rows = [
        dict(id=1, big=2**63 - 1, s="plain", txt="x" * 100_000, u="héllo wörld ✓ 🐘", blob=bytes(range(256)) * 40,
             f=0.1, num=decimal.Decimal("12345678.1234"), flag=True, d=datetime.date(2024, 2, 29),
             dt=datetime.datetime(1999, 12, 31, 23, 59, 59, 999999), tm=datetime.time(23, 59, 58, 123456),
             doc={"a": [1, 2.5, None, True], "b": {"c": "ünï"}, "big": 2**53}, mood=Mood.sad),
        dict(id=2, big=-(2**63), s="", txt="", u="", blob=b"", f=-1e308, num=decimal.Decimal("-0.0001"), flag=False,
             d=datetime.date(1, 1, 1), dt=datetime.datetime(2038, 1, 19, 3, 14, 8), tm=datetime.time(0, 0),
             doc=[], mood=Mood.happy),
        dict(id=3, big=None, s=None, txt=None, u=None, blob=None, f=None, num=None, flag=None, d=None, dt=None,
             tm=None, doc=None, mood=None),
    ]
    with engine.begin() as c:
        c.execute(t.insert(), rows)
    with engine.connect() as c:
        got = {r.id: r._asdict() for r in c.execute(sa.select(t))}
        assert set(got) == {1, 2, 3}
        for want in rows:
            row = got[want["id"]]
            assert isinstance(row.pop("ts"), datetime.datetime)     # a server default, parsed
            for k, v in want.items():
                assert row[k] == v and type(row[k]) is type(v), (want["id"], k, row[k], v)
        # JSON paths and type-aware comparisons run in the server's SQLite
        assert c.scalar(sa.select(t.c.id).where(t.c.doc["b"]["c"].as_string() == "ünï")) == 1
        assert c.scalar(sa.select(t.c.id).where(t.c.dt > datetime.datetime(2000, 1, 1))) == 2
        assert c.scalar(sa.select(sa.func.length(t.c.blob)).where(t.c.id == 1)) == 256 * 40
        # SQLite's storage classes underneath: the file is a normal SQLite database
        kinds = c.execute(sa.text("SELECT typeof(big), typeof(blob), typeof(f), typeof(flag), typeof(dt) "
                                  "FROM sa_types WHERE id = 1")).one()
        assert tuple(kinds) == ("integer", "blob", "real", "integer", "text")
    md.drop_all(engine)


def test_executemany_rowcounts_and_returning(engine):
    md = sa.MetaData()
    t = sa.Table("sa_bulk", md, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("grp", sa.Integer, nullable=False), sa.Column("name", sa.String(30)))
    md.create_all(engine)
    with engine.begin() as c:
        r = c.execute(t.insert(), [{"grp": i % 10, "name": f"n{i}"} for i in range(2000)])
        assert r.rowcount == 2000
    with engine.begin() as c:
        assert c.execute(t.update().where(t.c.grp == 3).values(name="three")).rowcount == 200
        assert c.execute(t.delete().where(t.c.grp == 9)).rowcount == 200
        assert c.execute(t.update().where(t.c.id == -1).values(name="none")).rowcount == 0
        # executemany of an UPDATE: the rows changed by all parameter sets
        r = c.execute(t.update().where(t.c.id == sa.bindparam("k")).values(name=sa.bindparam("v")),
                      [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}, {"k": -5, "v": "c"}])
        assert r.rowcount == 2
        # RETURNING (SQLite >= 3.35 on the server); id 2000 (grp 9) was deleted, so max is 1999
        new_id = c.execute(t.insert().values(grp=42, name="ret").returning(t.c.id)).scalar_one()
        assert new_id == 2000
        assert c.execute(t.update().where(t.c.grp == 42).values(name="upd").returning(t.c.id, t.c.name)).all() == \
            [(2000, "upd")]
        # a bulk INSERT ... RETURNING (insertmanyvalues): batched in one statement
        back = c.execute(t.insert().returning(t.c.id, t.c.name), [{"grp": 50, "name": f"m{i}"} for i in range(300)])
        assert sorted(back.all()) == [(2001 + i, f"m{i}") for i in range(300)]
        # in parameter order: SQLAlchemy sends one INSERT per row to SQLite (it does not trust the
        # order of new rowids), so keep such sets small over the network
        back = c.execute(t.insert().returning(t.c.id, t.c.name, sort_by_parameter_order=True),
                         [{"grp": 50, "name": f"o{i}"} for i in range(20)]).all()
        assert back == [(2301 + i, f"o{i}") for i in range(20)]
        assert sorted(c.execute(t.delete().where(t.c.grp == 50).returning(t.c.id)).scalars()) == \
            list(range(2001, 2321))
        # SQLite's upsert, compiled by the SQLite dialect, run by the server
        up = sqlite_insert(t).values(id=1, grp=0, name="up")
        c.execute(up.on_conflict_do_update(index_elements=[t.c.id], set_={"name": up.excluded.name + "sert"}))
        assert c.scalar(sa.select(t.c.name).where(t.c.id == 1)) == "upsert"
        # the single-row INSERT without RETURNING learns its key from lastrowid
        r = c.execute(t.insert().values(grp=60, name="last"))
        assert r.inserted_primary_key == (2001,)
    with engine.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(t)) == 2000 - 200 + 2
        assert c.scalar(sa.select(sa.func.count()).where(t.c.name == "three")) == 200
    md.drop_all(engine)


def test_transactions_isolation_savepoints_and_autocommit(engine, server):
    md = sa.MetaData()
    t = sa.Table("sa_tx", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.String(20)))
    md.create_all(engine)
    count = sa.select(sa.func.count()).select_from(t)
    with engine.begin() as c:
        c.execute(t.insert().values(id=1, v="committed"))
    with pytest.raises(ZeroDivisionError), engine.begin() as c:
        c.execute(t.insert().values(id=2, v="rolled back"))
        raise ZeroDivisionError("an error inside the transaction rolls it back")
    other = engine.connect()
    assert other.scalar(count) == 1
    other.rollback()
    # reads belong to the transaction too: a snapshot that another commit does not change
    with engine.connect() as reader:
        assert reader.scalar(count) == 1
        with engine.begin() as w:
            w.execute(t.insert().values(id=3, v="meanwhile"))
        assert reader.scalar(count) == 1            # same snapshot (pysqlite would see 2 here)
        reader.rollback()
        assert reader.scalar(count) == 2
    # transactional DDL: a CREATE TABLE rolled back is gone
    with engine.connect() as c:
        c.execute(sa.text("CREATE TABLE sa_ddl_gone(a)"))
        c.rollback()
        assert not sa.inspect(c).has_table("sa_ddl_gone")
    # savepoints (begin_nested): SAVEPOINT / ROLLBACK TO / RELEASE pass the server's authorizer
    with engine.begin() as c:
        sp = c.begin_nested()               # the first statement of the transaction is the SAVEPOINT
        c.execute(t.insert().values(id=10, v="inner, undone"))
        sp.rollback()
        with c.begin_nested():
            c.execute(t.insert().values(id=11, v="inner, kept"))
        with pytest.raises(sa_exc.IntegrityError), c.begin_nested():
            c.execute(t.insert().values(id=12, v="ok"))
            c.execute(t.insert().values(id=1, v="duplicate key"))
        c.execute(t.insert().values(id=13, v="outer"))
    with engine.connect() as c:
        assert c.execute(sa.select(t.c.id).order_by(t.c.id)).scalars().all() == [1, 3, 11, 13]
    # AUTOCOMMIT: each statement commits on its own, without any transaction on the server
    ac = engine.execution_options(isolation_level="AUTOCOMMIT")
    with ac.connect() as c:
        assert c.get_isolation_level() == "AUTOCOMMIT"
        c.execute(t.insert().values(id=20, v="autocommitted"))
        assert not c.connection.dbapi_connection.in_transaction
        assert other.scalar(sa.select(t.c.v).where(t.c.id == 20)) == "autocommitted"
        other.rollback()
    with engine.connect() as c:         # the pooled connection is back to SERIALIZABLE
        assert c.get_isolation_level() == "SERIALIZABLE"
        c.execute(t.insert().values(id=21, v="not yet"))
        assert other.scalar(sa.select(t.c.v).where(t.c.id == 21)) is None
        other.rollback()
    other.close()
    ac = sa.create_engine(url(server), isolation_level="AUTOCOMMIT")      # the same, engine-wide
    with ac.connect() as c:
        assert c.connection.dbapi_connection.autocommit and c.get_isolation_level() == "AUTOCOMMIT"
        c.execute(t.delete().where(t.c.id == 20))
    ac.dispose()
    with engine.connect() as c:
        assert c.scalar(sa.select(t.c.v).where(t.c.id == 20)) is None
    with (pytest.raises(sa_exc.ArgumentError, match="READ UNCOMMITTED"),
          engine.execution_options(isolation_level="READ UNCOMMITTED").connect() as c):
        c.execute(sa.text("SELECT 1"))
    md.drop_all(engine)


def test_reflection_of_tables_columns_keys_indexes_and_schemas(engine):
    with engine.begin() as c:
        c.execute(sa.text("CREATE TABLE sa_parent (id INTEGER PRIMARY KEY, code VARCHAR(10) NOT NULL UNIQUE, "
                          "name TEXT DEFAULT 'anon')"))
        c.execute(sa.text("CREATE TABLE sa_child (a INTEGER, b INTEGER, parent_code VARCHAR(10), "
                          "price NUMERIC(10, 2), PRIMARY KEY (a, b), "
                          "CONSTRAINT fk_parent FOREIGN KEY (parent_code) REFERENCES sa_parent(code) "
                          "ON DELETE CASCADE, CONSTRAINT uq_ab UNIQUE (b, price))"))
        c.execute(sa.text("CREATE INDEX ix_child_price ON sa_child(price DESC)"))
        c.execute(sa.text("CREATE VIEW sa_view AS SELECT a, b FROM sa_child"))
    insp = sa.inspect(engine)
    assert {"sa_parent", "sa_child", "accounts"} <= set(insp.get_table_names())
    assert insp.get_view_names() == ["sa_view"]
    assert "sa_child" in insp.get_view_definition("sa_view")
    cols = {c["name"]: c for c in insp.get_columns("sa_parent")}
    assert list(cols) == ["id", "code", "name"]
    assert isinstance(cols["id"]["type"], sa.INTEGER) and isinstance(cols["code"]["type"], sa.VARCHAR)
    assert cols["code"]["type"].length == 10 and cols["code"]["nullable"] is False
    assert cols["name"]["default"] == "'anon'"
    assert insp.get_pk_constraint("sa_child")["constrained_columns"] == ["a", "b"]
    fks = insp.get_foreign_keys("sa_child")
    assert len(fks) == 1 and fks[0]["name"] == "fk_parent" and fks[0]["referred_table"] == "sa_parent"
    assert fks[0]["constrained_columns"] == ["parent_code"] and fks[0]["referred_columns"] == ["code"]
    assert fks[0]["options"].get("ondelete") == "CASCADE"
    assert [(i["name"], i["column_names"]) for i in insp.get_indexes("sa_child")] == [("ix_child_price", ["price"])]
    assert {u["name"]: u["column_names"] for u in insp.get_unique_constraints("sa_child")} == {"uq_ab": ["b", "price"]}
    assert insp.has_table("sa_child") and not insp.has_table("sa_nope")
    # the daemon's other file of the database is an attached schema of its own
    assert "audit" in insp.get_schema_names()
    assert insp.get_table_names(schema="audit")
    # Table(autoload_with=...) builds a usable Table from the server's schema
    md = sa.MetaData()
    child = sa.Table("sa_child", md, autoload_with=engine)
    parent = md.tables["sa_parent"]
    assert [c.name for c in child.primary_key] == ["a", "b"]
    assert isinstance(child.c.price.type, sa.NUMERIC)
    with engine.begin() as c:
        c.execute(parent.insert(), [{"code": "p1"}, {"code": "p2", "name": "two"}])
        c.execute(child.insert(), [{"a": 1, "b": 1, "parent_code": "p1", "price": decimal.Decimal("9.99")}])
        q = sa.select(parent.c.name, child.c.price).join(child, child.c.parent_code == parent.c.code)
        assert c.execute(q).all() == [("anon", decimal.Decimal("9.99"))]
        c.execute(sa.text("DROP VIEW sa_view"))
    md.drop_all(engine)
    assert not sa.inspect(engine).has_table("sa_parent")


class Base(orm.DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_author"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    email: orm.Mapped[str] = orm.mapped_column(sa.String(80), unique=True)
    joined: orm.Mapped[datetime.datetime] = orm.mapped_column(default=lambda: datetime.datetime(2024, 5, 1, 9, 30))
    books: orm.Mapped[list[Book]] = orm.relationship(back_populates="author", cascade="all, delete-orphan",
                                                        order_by="Book.id")


class Book(Base):
    __tablename__ = "sa_book"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str] = orm.mapped_column(sa.Text)
    price: orm.Mapped[decimal.Decimal | None] = orm.mapped_column(sa.Numeric(8, 2))
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("sa_author.id"))
    author: orm.Mapped[Author] = orm.relationship(back_populates="books")
    version: orm.Mapped[int] = orm.mapped_column(default=1)
    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - read once by SQLAlchemy's declarative mapping


def test_orm_session_relationships_and_integrity_error(engine):
    Base.metadata.create_all(engine)
    with orm.Session(engine) as s:
        a = Author(email="ann@example.org", books=[Book(title="One", price=decimal.Decimal("10.50")),
                                                    Book(title="Two")])
        s.add_all([a, Author(email="bo@example.org")])
        s.commit()
        assert a.id is not None and [b.id for b in a.books] == [1, 2]
    with orm.Session(engine) as s:
        ann = s.scalars(sa.select(Author).where(Author.email.like("ann%"))
                        .options(orm.selectinload(Author.books))).one()
        assert [(b.title, b.price) for b in ann.books] == [("One", decimal.Decimal("10.50")), ("Two", None)]
        assert ann.joined == datetime.datetime(2024, 5, 1, 9, 30)
        ann.books[1].price = decimal.Decimal("7.25")       # versioned UPDATE: checks the rowcount
        ann.books.append(Book(title="Three"))
        s.commit()
        assert ann.books[1].version == 2
        rows = s.execute(sa.select(Author.email, sa.func.count(Book.id)).outerjoin(Author.books)
                         .group_by(Author.email).order_by(Author.email)).all()
        assert rows == [("ann@example.org", 3), ("bo@example.org", 0)]
        # a unique violation: SQLAlchemy's IntegrityError around the driver's
        s.add(Author(email="bo@example.org"))
        with pytest.raises(sa_exc.IntegrityError, match="UNIQUE") as ei:
            s.flush()
        assert isinstance(ei.value.orig, bc.IntegrityError)
        s.rollback()
        # the session goes on after the rollback; a savepoint keeps the outer work
        s.add(Author(email="cy@example.org"))
        with pytest.raises(sa_exc.IntegrityError), s.begin_nested():
            s.add(Author(email="ann@example.org"))
        s.commit()
        assert s.scalar(sa.select(sa.func.count()).select_from(Author)) == 3
        s.delete(ann)                          # cascades to the books
        s.commit()
        assert s.scalar(sa.select(sa.func.count()).select_from(Book)) == 0
    # two sessions change the same row: never a lost update
    with orm.Session(engine, expire_on_commit=False) as s1, orm.Session(engine) as s2:
        bo = s1.scalars(sa.select(Author).where(Author.email == "bo@example.org")).one()
        bo.books.append(Book(title="Solo"))
        s1.commit()
        b1 = s1.scalars(sa.select(Book)).one()
        s1.commit()                         # s1 keeps version 1 in memory, outside any transaction
        b2 = s2.scalars(sa.select(Book)).one()
        b2.title = "changed by s2"
        s2.commit()
        b1.title = "changed by s1"          # the versioned UPDATE matches no row
        with pytest.raises(orm.exc.StaleDataError):
            s1.commit()
        s1.rollback()
        # inside a transaction: s1 cannot write from a snapshot older than s2's commit (serializable)
        b1 = s1.scalars(sa.select(Book)).one()
        b2.title = "changed by s2 again"
        s2.commit()
        b1.title = "changed by s1"
        with pytest.raises(sa_exc.OperationalError, match="committed after this transaction's first read"):
            s1.commit()
        s1.rollback()
        assert s2.scalars(sa.select(Book.title)).one() == "changed by s2 again"
        s2.rollback()
    Base.metadata.drop_all(engine)


def test_read_only_user_and_server_refusals_come_back_as_sqlalchemy_errors(server, engine):
    ro = sa.create_engine(url(server, user="dave"))
    with ro.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM accounts")) == 20
        with pytest.raises(sa_exc.OperationalError, match="read-only") as ei:
            c.execute(sa.text("UPDATE accounts SET balance = 0"))
        assert isinstance(ei.value.orig, bc.AccessDenied)
        c.rollback()
    ro.dispose()
    with engine.connect() as c:
        with pytest.raises(sa_exc.OperationalError, match="journal_mode"):
            c.execute(sa.text("PRAGMA journal_mode = DELETE"))
        c.rollback()
        with pytest.raises(sa_exc.OperationalError, match="no such table"):
            c.execute(sa.text("SELECT * FROM sa_nowhere"))
        c.rollback()
        # pysqlite's Python functions do not exist in the daemon: regexp_match is unavailable
        with pytest.raises(sa_exc.OperationalError, match="no such function: REGEXP"):
            c.execute(sa.select(sa.literal("abc").regexp_match("b")))


def test_driver_lazy_begin(server):
    """The driver's begin(lazy=True), which the dialect's do_begin uses."""
    a = bc.connect(f"bastion://carol@127.0.0.1:{server.port}/bank", password=PW)
    b = bc.connect(f"bastion://carol@127.0.0.1:{server.port}/bank", password=PW)
    a.execute("CREATE TABLE IF NOT EXISTS lazy(x INTEGER PRIMARY KEY)")
    a.begin(lazy=True)
    assert not a.in_transaction                     # nothing sent yet
    with pytest.raises(bc.ProgrammingError, match="already open"):
        a.begin()
    # a first statement that fails begins nothing, and the begin still applies to the next one
    with pytest.raises(bc.OperationalError, match="no such table"):
        a.execute("SELECT * FROM lazy_nope")
    assert not a.in_transaction
    assert a.execute("SELECT count(*) FROM lazy").fetchone() == (0,)   # a read: the transaction starts here
    assert a.in_transaction
    b.execute("INSERT INTO lazy VALUES (1)")
    b.commit()
    assert a.execute("SELECT count(*) FROM lazy").fetchone() == (0,)   # a's snapshot
    a.rollback()
    assert a.execute("SELECT count(*) FROM lazy").fetchone() == (1,)
    assert not a.in_transaction                     # back to sqlite3's rule: only DML begins
    a.begin(lazy=True)
    a.commit()                                      # nothing was begun: nothing to send
    a.execute("DROP TABLE lazy")
    a.close()
    b.close()


def test_pool_drops_connections_after_idle_timeout_and_daemon_restart(tmp_path):
    d = _start(tmp_path)
    try:
        e = sa.create_engine(url(d, query="?failover_timeout=2"), pool_size=2, max_overflow=0)
        with e.begin() as c:
            c.execute(sa.text("CREATE TABLE sa_r(a INTEGER)"))
        # a transaction left idle past the server's idle timeout: a clear error, and the pool
        # replaces the connection
        c = e.connect()
        c.execute(sa.text("INSERT INTO sa_r VALUES (1)"))
        first = c.connection.dbapi_connection
        time.sleep(IDLE + 1.5)
        with pytest.raises(sa_exc.OperationalError, match="idle") as ei:
            c.execute(sa.text("INSERT INTO sa_r VALUES (2)"))
        assert ei.value.connection_invalidated and isinstance(ei.value.orig, bc.TransactionLost)
        c.rollback()
        assert c.scalar(sa.text("SELECT count(*) FROM sa_r")) == 0          # nothing of it was committed
        assert c.connection.dbapi_connection is not first
        c.close()
        # kill -9 of the daemon with a transaction in flight and idle connections in the pools
        e2 = sa.create_engine(url(d), pool_size=1, max_overflow=0, pool_pre_ping=True)
        with e2.connect() as x:
            x.execute(sa.text("SELECT 1"))
            survivor = x.connection.dbapi_connection
        c = e.connect()
        c.execute(sa.text("INSERT INTO sa_r VALUES (3)"))
        d.kill9()
        # no node for longer than failover_timeout: the pool drops the connection
        with pytest.raises(sa_exc.OperationalError, match="no active Bastion node") as ei, e.connect() as x:
            x.execute(sa.text("SELECT 1"))
        assert ei.value.connection_invalidated
        # the transaction in flight: TransactionLost, never a replay
        with pytest.raises(sa_exc.OperationalError, match="lost during a transaction") as ei:
            c.execute(sa.text("INSERT INTO sa_r VALUES (4)"))
        assert ei.value.connection_invalidated and isinstance(ei.value.orig, bc.TransactionLost)
        d.start()
        c.rollback()
        with e.begin() as c2:
            c2.execute(sa.text("INSERT INTO sa_r VALUES (5)"))
        c.close()
        with e.connect() as x:
            assert x.execute(sa.text("SELECT a FROM sa_r")).scalars().all() == [5]
            assert x.scalar(sa.text("PRAGMA integrity_check")) == "ok"
        # a connection idle in the pool during the restart goes on (pre-ping and all) without noticing
        with e2.connect() as x:
            assert x.scalar(sa.text("SELECT count(*) FROM sa_r")) == 1
            assert x.connection.dbapi_connection is survivor
        e2.dispose()
        e.dispose()
        assert check_bank(tmp_path / "app")["ok"]
    finally:
        d.stop()
