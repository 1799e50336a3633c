"""Reading records from files, hub datasets and the shipped datasets (``demo:NAME``).

JSONL is parsed here line by line so that a broken line is reported with its number; JSON, CSV
and Parquet go through ``datasets``; a hub id goes through ``datasets.load_dataset``. Every
record keeps where it came from (``file:line`` or ``file row N``) for error messages. Records in
other tools' layouts (ShareGPT, alpaca, renamed columns) are converted as they are read
(forgetless/data/conversions.py).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from forgetless.config import DatasetSpec
from forgetless.data.builtin import builtin_path, is_builtin
from forgetless.data.conversions import convert
from forgetless.errors import DataError


@dataclass
class Record:
    data: dict[str, Any]
    where: str  # "file.jsonl:12" / "file.csv row 3" / "org/name[train] row 7"


def load_records(spec: DatasetSpec) -> list[Record]:
    """All records of one dataset, in file order (``spec.limit`` applied)."""
    path = spec.path
    if is_builtin(path):
        path = str(builtin_path(path))
    p = Path(path)
    suffix = p.suffix.lower()
    if p.is_dir():
        raise DataError(f"{path}: is a directory; give a .jsonl, .json, .csv, .parquet or .txt file")
    if p.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_tabular, ".parquet": _read_tabular, ".txt": _read_txt}
        if suffix not in readers:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv, .parquet or .txt")
        records = readers[suffix](p, spec.limit)
    elif suffix in {".jsonl", ".json", ".csv", ".parquet", ".txt"} or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: file not found; check the path")
    else:
        records = _read_hub(spec)
    if not records:
        raise DataError(f"{path}: the dataset is empty; it needs at least one record")
    records = records[: spec.limit] if spec.limit else records
    return [Record(convert(r.data, r.where, spec.columns), r.where) for r in records]


def iter_records(spec: DatasetSpec, streaming: bool = False) -> Iterator[Record]:
    """The records of one dataset one at a time (converted as :func:`load_records` does), so that
    a big JSONL file is never held in memory (forgetless/data/arrow.py, stream.py); with
    ``streaming``, a hub dataset is read through ``datasets``' streaming too; other kinds are read whole."""
    path = str(builtin_path(spec.path)) if is_builtin(spec.path) else spec.path
    p = Path(path)
    if streaming and not p.exists() and not is_builtin(spec.path) and not path.startswith((".", "/", "~")):
        yield from _stream_hub(spec)
        return
    if p.is_file() and p.suffix.lower() == ".jsonl":
        n = 0
        for rec in _iter_jsonl(p):
            yield Record(convert(rec.data, rec.where, spec.columns), rec.where)
            n += 1
            if spec.limit and n >= spec.limit:
                return
        if n == 0:
            raise DataError(f"{path}: the dataset is empty; it needs at least one record")
        return
    yield from load_records(spec)


def _read_jsonl(p: Path, limit: int | None) -> list[Record]:
    records = []
    for rec in _iter_jsonl(p):
        records.append(rec)
        if limit and len(records) >= limit:
            break
    return records


def _iter_jsonl(p: Path) -> Iterator[Record]:
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{n}: not valid UTF-8 (byte {e.start + 1} of the line); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            obj = _parse_json(line, p, n, "fix or remove this line")
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            yield Record(obj, f"{p}:{n}")


def _parse_json(text: str, p: Path, line: int | None, what_to_do: str):
    """``json.loads``, with every way it can fail turned into a DataError naming the file and line."""
    where = f"{p}:{line}" if line else str(p)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{line or e.lineno}: malformed JSON ({e.msg} at column {e.colno}); {what_to_do}") from None
    except ValueError as e:  # e.g. an integer longer than Python converts
        raise DataError(f"{where}: unreadable JSON value ({str(e).splitlines()[0][:120]}); {what_to_do}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; {what_to_do}") from None


def _decode_utf8(p: Path) -> str:
    """The text of ``p``, or a DataError naming the line and byte of the first bad byte."""
    raw = p.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = raw.count(b"\n", 0, at) + 1
        column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte {column} of the line); re-save the file as UTF-8") from None


def _read_json(p: Path, limit: int | None) -> list[Record]:
    obj = _parse_json(_decode_utf8(p), p, None, "fix the file")
    if isinstance(obj, dict):
        # {"data": [...]} or a dict of columns
        if len(obj) == 1 and isinstance(next(iter(obj.values())), list) and all(isinstance(r, dict) for r in next(iter(obj.values()))):
            obj = next(iter(obj.values()))
        elif obj and all(isinstance(v, list) for v in obj.values()):
            n = len(next(iter(obj.values())))
            if any(len(v) != n for v in obj.values()):
                raise DataError(f"{p}: columns have different lengths; a dict of columns needs equal lengths")
            obj = [{k: v[i] for k, v in obj.items()} for i in range(n)]
        else:
            raise DataError(f"{p}: expected a list of records (or a dict of equal-length columns)")
    if not isinstance(obj, list):
        raise DataError(f"{p}: expected a list of records, got {type(obj).__name__}")
    records = []
    for i, rec in enumerate(obj[:limit] if limit else obj):
        if not isinstance(rec, dict):
            raise DataError(f"{p} record {i}: expected a JSON object, got {type(rec).__name__}")
        records.append(Record(rec, f"{p} record {i}"))
    return records


def _read_tabular(p: Path, limit: int | None) -> list[Record]:
    from datasets import Dataset

    try:
        ds = Dataset.from_csv(str(p)) if p.suffix.lower() == ".csv" else Dataset.from_parquet(str(p))
    except Exception as e:  # pyarrow raises many types for a broken file
        raise DataError(f"{p}: could not read it ({str(e).splitlines()[0][:200]}); check the file") from None
    n = len(ds) if not limit else min(limit, len(ds))
    # CSV row numbers count the header as line 1, so data row i sits on line i + 2.
    offset = 2 if p.suffix.lower() == ".csv" else 0
    label = (lambda i: f"{p}:{i + offset}") if offset else (lambda i: f"{p} row {i}")
    return [Record(dict(ds[i]), label(i)) for i in range(n)]


def _read_txt(p: Path, limit: int | None) -> list[Record]:
    """Plain text: one record per paragraph (paragraphs are separated by blank lines)."""
    text = _decode_utf8(p)
    records, line, para, start = [], 1, [], 1
    for raw in text.splitlines() + [""]:
        if raw.strip():
            if not para:
                start = line
            para.append(raw)
        elif para:
            records.append(Record({"text": "\n".join(para)}, f"{p}:{start}"))
            para = []
        line += 1
    return records[:limit] if limit else records


def _stream_hub(spec: DatasetSpec) -> Iterator[Record]:
    import datasets

    try:
        stream = datasets.load_dataset(spec.path, spec.subset, split=spec.split, streaming=True)
    except Exception as e:  # offline, unknown id, gated, bad split
        raise DataError(
            f"{spec.path}: not a local file, and streaming it as a hub dataset failed "
            f"({str(e).splitlines()[0][:200]}); check the path or id, split and network"
        ) from None
    for i, rec in enumerate(stream):
        if spec.limit and i >= spec.limit:
            return
        where = f"{spec.path}[{spec.split}] row {i}"
        yield Record(convert(dict(rec), where, spec.columns), where)


def _read_hub(spec: DatasetSpec) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as e:  # offline, unknown id, gated, bad split: all reach the user the same way
        raise DataError(
            f"{spec.path}: not a local file, and loading it as a hub dataset failed "
            f"({str(e).splitlines()[0][:200]}); check the path or id, split and network"
        ) from None
    n = len(ds) if not spec.limit else min(spec.limit, len(ds))
    return [Record(dict(ds[i]), f"{spec.path}[{spec.split}] row {i}") for i in range(n)]
