"""SQLite values in JSON, exactly.

JSON has integers, floats, strings and null, which are four of SQLite's five storage
classes, so those travel as themselves (Python's json writes floats with repr, which
round-trips every finite double, and keeps 1.0 a float). The rest are tagged objects:

    {"$blob": "<base64>"}              a BLOB
    {"$float": "inf" | "-inf"}         infinities (SQLite has no NaN: it stores NULL)
    {"$text": "<base64>"}              in results only: TEXT whose bytes are not valid UTF-8
                                       (JSON strings cannot hold them); the driver
                                       decodes it with errors="surrogateescape"

A plain JSON object that is not one of these tags is refused as a parameter, so a
client can never be misread.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from ..errors import UsageError


def encode(value: Any) -> Any:
    if value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isinf(value):
            return {"$float": "inf" if value > 0 else "-inf"}
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$blob": base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_text(raw: bytes) -> Any:
    """A TEXT value read as its bytes: a string if they are UTF-8, else tagged."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"$text": base64.b64encode(raw).decode("ascii")}


def decode(value: Any, where: str = "parameter") -> Any:
    if value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, bool):     # JSON true/false: SQLite has no boolean, it stores 1/0
        return int(value)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise UsageError(f"{where}: integer {value} does not fit SQLite's 64-bit integers",
                             hint="send it as text or as a float")
        return value
    if isinstance(value, dict) and len(value) == 1:
        if "$blob" in value and isinstance(value["$blob"], str):
            try:
                return base64.b64decode(value["$blob"], validate=True)
            except ValueError:
                raise UsageError(f"{where}: $blob is not valid base64") from None
        if value.get("$float") in ("inf", "-inf", "nan"):
            return float(value["$float"])
    raise UsageError(f"{where}: {value!r} is not a SQLite value",
                     hint='use null, numbers, strings, {"$blob": "<base64>"} or {"$float": "inf"}')


def encode_row(row: tuple) -> list[Any]:
    return [encode(v) for v in row]


def decode_params(params: Any, where: str) -> Any:
    """Positional (list) or named (object of name -> value) parameters."""
    if params is None:
        return None
    if isinstance(params, list):
        for v in params:        # the common case, plain values, without a call per value
            t = type(v)
            if not (t is str or t is float or v is None or (t is int and -(2**63) <= v < 2**63)):
                return tuple(decode(v, f"{where} parameter {i + 1}") for i, v in enumerate(params))
        return tuple(params)
    if isinstance(params, dict):
        if len(params) == 1 and next(iter(params)) in ("$blob", "$float"):
            raise UsageError(f"{where}: parameters must be a list or an object of names")
        return {k: decode(v, f"{where} parameter :{k}") for k, v in params.items()}
    raise UsageError(f"{where}: parameters must be a list (for ?) or an object (for :name)")
