"""Which PEP 249 exception a SQLite error becomes: the table of Python's sqlite3 module.

The server sends SQLite's extended result code (and apsw's class name) with every
statement error; the primary code (its low byte) picks the class, exactly as
CPython's ``Modules/_sqlite/util.c`` does, so code written against ``sqlite3`` catches
the same exception here. Notably a datatype mismatch (a non-integer into an INTEGER
PRIMARY KEY: SQLITE_MISMATCH; a STRICT table's type check: SQLITE_CONSTRAINT_DATATYPE)
is an ``IntegrityError``. Codes sqlite3 does not name are ``DatabaseError``.
"""

from __future__ import annotations

from typing import Any

# primary result code -> PEP 249 class name (sqlite3 raises MemoryError for NOMEM: an
# out-of-memory server is an operational problem of the server, not of this process)
BY_CODE: dict[int, str] = {
    1: "OperationalError",    # ERROR (syntax, no such table, ...)
    2: "InternalError",       # INTERNAL
    3: "OperationalError",    # PERM
    4: "OperationalError",    # ABORT
    5: "OperationalError",    # BUSY
    6: "OperationalError",    # LOCKED
    7: "OperationalError",    # NOMEM
    8: "OperationalError",    # READONLY
    9: "OperationalError",    # INTERRUPT
    10: "OperationalError",   # IOERR
    11: "DatabaseError",      # CORRUPT
    12: "InternalError",      # NOTFOUND
    13: "OperationalError",   # FULL
    14: "OperationalError",   # CANTOPEN
    15: "OperationalError",   # PROTOCOL
    16: "OperationalError",   # EMPTY
    17: "OperationalError",   # SCHEMA
    18: "DataError",          # TOOBIG
    19: "IntegrityError",     # CONSTRAINT (and its extended codes: UNIQUE, NOTNULL, DATATYPE, ...)
    20: "IntegrityError",     # MISMATCH
    21: "InterfaceError",     # MISUSE
    25: "InterfaceError",     # RANGE
}
# apsw's exception class name -> primary code, for an error that came without a code
APSW_CODES: dict[str, int] = {
    "SQLError": 1, "InternalError": 2, "PermissionsError": 3, "AbortError": 4, "BusyError": 5,
    "LockedError": 6, "NoMemError": 7, "ReadOnlyError": 8, "InterruptError": 9, "IOError": 10,
    "CorruptError": 11, "NotFoundError": 12, "FullError": 13, "CantOpenError": 14, "ProtocolError": 15,
    "EmptyError": 16, "SchemaChangeError": 17, "TooBigError": 18, "ConstraintError": 19, "MismatchError": 20,
    "MisuseError": 21, "NoLFSError": 22, "AuthError": 23, "FormatError": 24, "RangeError": 25, "NotADBError": 26,
}


def primary_code(details: dict[str, Any]) -> int | None:
    ext = details.get("extended_code")
    if isinstance(ext, int) and not isinstance(ext, bool) and ext > 0:
        return ext & 0xFF
    return APSW_CODES.get(str(details.get("sqlite_error")))


def class_name(details: dict[str, Any]) -> str | None:
    """The PEP 249 class for a statement error the server reported (``details`` of its
    answer), or None when it names no SQLite error."""
    code = primary_code(details)
    return None if code is None else BY_CODE.get(code, "DatabaseError")
