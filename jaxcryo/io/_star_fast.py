"""The numpy reader of plain RELION STAR files (:func:`_read_blocks_fast`), standing in for the ``starfile``
package (and its pandas import, ~0.2-0.45 s) on files it is certain of: no quotes, one row per line, ... It
returns ``None`` for anything else; :mod:`jaxcryo.io.star` then reads the file with ``starfile``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

class _Column:
    """One column of a :class:`_Table`: the few ``pandas.Series`` operations :func:`_read_star` uses."""

    __slots__ = ("values",)

    def __init__(self, values: np.ndarray):
        self.values = values  # int64, float64, or str (numpy unicode, or object of str)

    def to_numpy(self, dtype=None) -> np.ndarray:
        # A string column raises ValueError for any non-number, as pandas does.
        return self.values if dtype is None else self.values.astype(dtype)

    def astype(self, dtype) -> "_Column":
        if dtype is not str:
            raise TypeError(f"_Column.astype supports str only, not {dtype!r}")
        return _Column(np.array([str(v) for v in self.values.tolist()], dtype=object))


class _Table:
    """A STAR loop as numpy columns: the few ``pandas.DataFrame`` operations :func:`_read_star` uses."""

    def __init__(self, cols: dict, n: int):
        self._cols, self._n = cols, n

    @property
    def columns(self) -> list:
        return list(self._cols)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, col: str) -> _Column:
        return _Column(self._cols[col])

    def __setitem__(self, col: str, values) -> None:
        values = np.asarray(values)
        if values.shape != (self._n,):
            raise ValueError(f"column {col}: {values.shape[:1]} values for {self._n} rows")
        self._cols[col] = values

    def reset_index(self, drop: bool = True) -> "_Table":
        return _Table(dict(self._cols), self._n)


# Bytes a plain STAR file is made of: printable ASCII, tab, newline, CR (of CRLF); not quotes (STAR strings)
# nor backslashes.
_FAST_BYTES = bytes(sorted(set(b"\t\n\r" + bytes(range(0x20, 0x7F))) - set(b"\"'\\")))
# Tokens pandas (as starfile calls it) reads as NaN or booleans, not as the string.
_PANDAS_SPECIAL = frozenset({"nan", "NaN", "<NA>", "True", "TRUE", "true", "False", "FALSE", "false"})
_RESERVED = ("loop_", "save_", "global_", "stop_", ";", "_")  # a row starting so: not a row


def _fast_column(tokens: tuple):
    """A column's values as pandas would infer them (int64, float64 or str), or None if not certain."""
    for kind, dtype in ((int, np.int64), (float, np.float64)):
        try:
            v = np.array(list(map(kind, tokens)), dtype=dtype)
        except OverflowError:  # beyond int64: pandas makes uint64 or objects
            return None
        except ValueError:
            continue
        # int()/float() also take 1_000, nan, inf(inity) (any case): left to pandas (ASCII is checked before).
        if "_" in "".join(tokens) or (kind is float and not np.isfinite(v).all()):
            return None
        return v
    if not _PANDAS_SPECIAL.isdisjoint(tokens):
        return None
    return np.array(tokens)


def _fast_numericise(v: str):
    for kind in (int, float):  # as starfile does for key-value blocks
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _read_blocks_fast(path: Path) -> dict | None:
    """The blocks of a plain STAR file: name (``data_NAME`` -> ``NAME``, as ``starfile`` names them) ->
    :class:`_Table` for a loop, ``dict`` for key-value pairs; None (use ``starfile``) for anything unusual:
    quotes, comments inside rows, rows with a different field count, multi-line values, ``save_`` frames,
    several loops in a block, empty loops or blocks, NaN/inf/boolean-like values, non-ASCII text, ...
    """
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if raw.translate(None, _FAST_BYTES):  # any other byte
        return None
    text = raw.decode("ascii")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
        if "\r" in text:
            return None
    lines = text.split("\n")
    n, i = len(lines), 0
    while i < n and not lines[i].strip().startswith("data_"):  # preamble: blank lines and comments only
        s = lines[i].strip()
        if s and not s.startswith("#"):
            return None
        i += 1
    blocks: dict = {}
    while i < n:  # lines[i] is a data_ line
        name = lines[i].strip()[5:]
        if name in blocks or name != "".join(name.split()):
            return None
        i += 1
        while i < n and (not lines[i].strip() or lines[i].strip().startswith("#")):
            i += 1
        if i == n:
            return None  # an empty block
        s = lines[i].strip()
        if s == "loop_":
            i += 1
            names = []
            while i < n and lines[i].strip().startswith("_"):
                toks = lines[i].split()
                if len(toks[0]) < 2 or (len(toks) > 1 and not toks[1].startswith("#")):
                    return None
                names.append(toks[0][1:])
                i += 1
            if not names or len(set(names)) != len(names):
                return None
            rows = []
            while i < n:
                s = lines[i].strip()
                if s.startswith("data_"):
                    break
                if s and not s.startswith("#"):
                    if "#" in s or s.startswith(_RESERVED):
                        return None
                    rows.append(s.split())
                i += 1
            if not rows or any(len(r) != len(names) for r in rows):
                return None
            cols = {}
            for col, tokens in zip(names, zip(*rows)):
                v = _fast_column(tokens)
                if v is None or (col == "rlnImageName" and v.dtype.kind != "U"):
                    return None
                cols[col] = v
            blocks[name] = _Table(cols, len(rows))
        elif s.startswith("_"):
            pairs = {}
            while i < n:
                s = lines[i].strip()
                if s.startswith("data"):
                    if not s.startswith("data_"):
                        return None
                    break
                if s and not s.startswith("#"):
                    toks = s.split()
                    if not s.startswith("_") or len(toks) != 2 or len(toks[0]) < 2:
                        return None
                    pairs[toks[0][1:]] = _fast_numericise(toks[1])
                i += 1
            blocks[name] = pairs
        else:
            return None
    return blocks or None
