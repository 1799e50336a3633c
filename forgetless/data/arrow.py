"""Large training data: records tokenized through ``datasets`` into a memory-mapped Arrow cache.

With ``data.num_proc > 1``, or training files of ``data.arrow_min_mb`` MB and more, the training
data does not become a Python list. Its records are read one at a time (the same readers, so a
broken line is still reported with its number) into an Arrow table by
``datasets.Dataset.from_generator``, tokenized by ``Dataset.map(num_proc=...)`` with the encoder of
forgetless/data/formats.py, and saved under ``$FORGETLESS_CACHE/tokenized/<fingerprint>``. The
fingerprint covers the data (path, size and modification time of a file; id, subset, split and
revision of a hub dataset), the tokenizer (its vocabulary, special tokens and chat template) and
every data option that changes the tokens, so a second run on the same data and model loads the
cache at once (memory-mapped: data bigger than memory trains in bounded memory) and any change
tokenizes again. :class:`ExampleTable` gives the rows as :class:`Example` objects on access.

The training order is unchanged: the same seeded permutation over the rows (forgetless/data/batching.py),
so a run on the Arrow path has the same batches, weights and exact resume as in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from forgetless.data.encoding import no_usable_records
from forgetless.data.formats import EncodeStats, Encoder, Example
from forgetless.data.loading import Record, iter_records
from forgetless.errors import DataError

FORMAT_VERSION = "1"  # bump when the stored columns change
_FIELDS = ("input_ids", "labels", "prompt_ids", "reference", "choices", "choice_chars", "answer", "eos_appended", "where")


def cache_dir() -> Path:
    from forgetless.models.fetch import cache_root

    return cache_root() / "tokenized"


def wants_arrow(specs, data_cfg) -> bool:
    """Whether the training data goes the Arrow way: several processes asked for, or big files."""
    if data_cfg.num_proc > 1:
        return True
    size = 0
    for spec in specs:
        p = Path(spec.path)
        if p.is_file():
            size += p.stat().st_size
    return size >= data_cfg.arrow_min_mb * 2**20


def _tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)).encode())
    h.update(json.dumps([str(tok.chat_template), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, type(tok).__name__]).encode())
    return h.hexdigest()


def _data_identity(spec) -> dict:
    p = Path(spec.path)
    if p.is_file():
        st = p.stat()
        return {"file": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"hub": spec.path, "subset": spec.subset, "split": spec.split}


def fingerprint(encoder: Encoder, spec) -> str:
    cfg = encoder.cfg
    parts = {
        "version": FORMAT_VERSION, "data": _data_identity(spec), "format": spec.format, "limit": spec.limit, "columns": spec.columns,
        "max_length": cfg.max_length, "truncation": cfg.truncation, "completion_only_loss": cfg.completion_only_loss,
        "chat_template": cfg.chat_template, "chat_template_kwargs": cfg.chat_template_kwargs,
        "tokenizer": _tokenizer_fingerprint(encoder.tok),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _encode_batch(batch: dict, encoder: Encoder, requested: str) -> dict:
    """datasets.map function: records (JSON text) -> the Example columns; errors and drops as columns."""
    out: dict[str, list] = {k: [] for k in (*_FIELDS, "fmt", "kept", "truncated", "dropped_too_long", "dropped_no_target", "error")}
    for text, where in zip(batch["data"], batch["where"]):
        stats = EncodeStats()
        ex, error = None, ""
        try:
            ex = encoder.encode_record(Record(json.loads(text), where), requested, stats)
        except DataError as e:
            error = str(e)
        out["fmt"].append(next(iter(stats.formats), ""))
        out["error"].append(error)
        out["kept"].append(ex is not None)
        for k in ("truncated", "dropped_too_long", "dropped_no_target"):
            out[k].append(getattr(stats, k))
        for k in _FIELDS:
            out[k].append(getattr(ex, k) if ex is not None else (where if k == "where" else None))
    return out


def tokenize(encoder: Encoder, spec, num_proc: int = 1, root: Optional[Path] = None):
    """The tokenized rows of ``spec`` (a datasets.Dataset, memory-mapped) and what encoding did, cached."""
    import datasets

    root = Path(root) if root is not None else cache_dir()
    key = fingerprint(encoder, spec)
    final = root / key
    if not (final / "forgetless_stats.json").is_file():
        work = root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            raw = datasets.Dataset.from_generator(
                record_rows, gen_kwargs={"specs": [spec]}, cache_dir=str(work / "raw"),
                features=datasets.Features({k: datasets.Value("string") for k in ("data", "where", "format")}),
            )
            with _spawned_workers(num_proc > 1):
                mapped = raw.map(_encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                                 fn_kwargs={"encoder": encoder, "requested": spec.format}, remove_columns=["data", "where", "format"],
                                 features=_features(), cache_file_name=str(work / "mapped.arrow"), desc=None)
            errors = mapped.filter(lambda e: bool(e), input_columns="error", num_proc=None)
            if len(errors):
                raise DataError(errors[0]["error"])
            stats = EncodeStats(records=len(mapped))
            for k in ("truncated", "dropped_too_long", "dropped_no_target"):
                setattr(stats, k, int(sum(mapped[k])))
            for fmt in mapped["fmt"]:
                stats.formats[fmt] = stats.formats.get(fmt, 0) + 1
            kept = mapped.filter(lambda k: k, input_columns="kept")
            stats.kept = len(kept)
            kept = kept.remove_columns(["fmt", "kept", "truncated", "dropped_too_long", "dropped_no_target", "error"])
            kept.save_to_disk(str(work / "rows"))
            meta = {"stats": vars(stats), "content": _content_hash(kept)}
            (work / "rows" / "forgetless_stats.json").write_text(json.dumps(meta), encoding="utf-8")
            if final.exists():  # another process finished first
                shutil.rmtree(work, ignore_errors=True)
            else:
                os.replace(work / "rows", final)
        except datasets.exceptions.DatasetGenerationError as e:  # our readers' DataError, raised inside the generator
            cause = e.__cause__ or e.__context__
            if isinstance(cause, DataError):
                raise DataError(str(cause)) from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    meta = json.loads((final / "forgetless_stats.json").read_text(encoding="utf-8"))
    return datasets.load_from_disk(str(final)), EncodeStats(**meta["stats"]), meta["content"]


@contextmanager
def _spawned_workers(on: bool):
    """datasets' map workers started fresh ("spawn") instead of forked: a fork of a process whose other
    threads hold locks (torch's thread pool, a progress bar's monitor thread) can hang its children,
    which is what happened here in a long-running process. Restored afterwards."""
    if not on:
        yield
        return
    import multiprocess

    before = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(before, force=True)


def _features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({
        "input_ids": ids, "labels": ids, "prompt_ids": ids, "reference": datasets.Value("string"),
        "choices": datasets.Sequence(ids), "choice_chars": ids, "answer": datasets.Value("int64"),
        "eos_appended": datasets.Value("bool"), "where": datasets.Value("string"), "fmt": datasets.Value("string"),
        "kept": datasets.Value("bool"), "truncated": datasets.Value("int64"), "dropped_too_long": datasets.Value("int64"),
        "dropped_no_target": datasets.Value("int64"), "error": datasets.Value("string"),
    })


def _content_hash(table) -> str:
    """sha256 of every row's token ids and labels, in order: what a resume must find again."""
    from array import array

    h = hashlib.sha256()
    for batch in table.select_columns(["input_ids", "labels"]).iter(batch_size=4096):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            h.update(array("q", ids).tobytes())
            h.update(array("q", labels).tobytes())
    return h.hexdigest()


def record_rows(specs, streaming: bool = False) -> Iterator[dict]:
    """The records of every spec, one at a time, as rows of JSON text (any record layout fits one
    column), with the format each is read as: what datasets' generators take (here and data/stream.py)."""
    for spec in specs:
        for rec in iter_records(spec, streaming):
            yield {"data": json.dumps(rec.data, ensure_ascii=False, default=str), "where": rec.where, "format": spec.format}


class ExampleTable(Sequence):
    """The rows of one or several tokenized datasets as :class:`Example` objects, built on access."""

    def __init__(self, tables: list, keys: list[str]):
        self.tables = tables
        self.keys = keys
        self.offsets = [0]
        for t in tables:
            self.offsets.append(self.offsets[-1] + len(t))

    @property
    def fingerprint(self) -> str:
        """Identifies the rows by their content (each table's hash of its token ids and labels)."""
        return hashlib.sha256("\0".join(self.keys).encode()).hexdigest()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        t = next(k for k in range(len(self.tables)) if i < self.offsets[k + 1])
        row = self.tables[t][i - self.offsets[t]]
        return Example(row["input_ids"], row["labels"], row["where"], prompt_ids=row["prompt_ids"], reference=row["reference"],
                       choices=row["choices"], choice_chars=row["choice_chars"], answer=row["answer"], eos_appended=bool(row["eos_appended"]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def without(self, held: set[int]) -> "ExampleTable":
        """The table without the rows ``held`` (a hold-out)."""
        tables = []
        for k, t in enumerate(self.tables):
            keep = [j for j in range(len(t)) if self.offsets[k] + j not in held]
            tables.append(t.select(keep))
        return ExampleTable(tables, [*self.keys, "without:" + hashlib.sha256(repr(sorted(held)).encode()).hexdigest()])


def encode_to_table(encoder: Encoder, specs, num_proc: int = 1, root: Optional[Path] = None) -> tuple[ExampleTable, EncodeStats]:
    """Several datasets tokenized through Arrow (concatenated), and their combined stats."""
    tables, keys, total = [], [], EncodeStats()
    for spec in specs:
        table, stats, key = tokenize(encoder, spec, num_proc, root)  # key: the table's content hash
        if not len(table):
            raise no_usable_records(spec, stats)
        tables.append(table)
        keys.append(key)
        total.add(stats)
    return ExampleTable(tables, keys), total
