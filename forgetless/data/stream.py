"""Training data read as a stream (``data.streaming``): for data too big to tokenize up front or keep on disk.

The records of ``data.train`` (local files read one at a time by forgetless's readers, a hub
dataset through ``datasets.load_dataset(..., streaming=True)``) form a ``datasets.IterableDataset``,
shuffled in a buffer of ``data.stream_buffer`` records with the seed (``IterableDataset.shuffle``;
epoch ``e`` with seed ``seed + e``), and are tokenized as they are drawn. Position ``i`` of the
stream is the ``i``-th usable example of that order, across epochs, so the stream is a function of
the seed and the data alone, like the in-memory order.

What stays exact on ``--resume``: everything. The data position of a run is its step number
(forgetless/data/batching.py); a resumed stream is read again from its start and the examples
before the position are skipped (read and tokenized, not trained on), so the resumed run sees the
examples the uninterrupted run saw and ends with the same weights. The price is the time to
re-read the skipped part of the stream. Each process reads the whole stream and takes its share of
every global batch (the same order everywhere; the reading is repeated per process).

The data are identified for resume by what the stream reads (a file's path, size and
modification time, a hub dataset's id, subset and split) and the tokenizer and options: a changed
file refuses the resume, as a changed in-memory dataset does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterator, Optional

from forgetless.data.formats import EncodeStats, Encoder, Example
from forgetless.data.loading import Record
from forgetless.errors import UserError


class ExampleStream:
    """The examples of ``specs`` in the seeded stream order; ``take(a, b)`` gives positions ``a .. b-1``."""

    def __init__(self, encoder: Encoder, specs, seed: int, buffer_size: int):
        self.encoder, self.specs, self.seed, self.buffer_size = encoder, list(specs), seed, buffer_size
        self.stats = EncodeStats()
        self._counted = 0  # records of the first epoch already in the stats
        self._it: Optional[Iterator[Example]] = None
        self._pos = 0
        self._last: tuple[int, int, list[Example]] = (0, 0, [])

    # -- identity --

    @property
    def fingerprint(self) -> str:
        from forgetless.data.arrow import fingerprint

        keys = [fingerprint(self.encoder, s) for s in self.specs] + [f"stream:{self.seed}:{self.buffer_size}"]
        return hashlib.sha256("\0".join(keys).encode()).hexdigest()

    # -- reading --

    def _records(self, epoch: int):
        import datasets

        from forgetless.data.arrow import record_rows

        stream = datasets.IterableDataset.from_generator(record_rows, gen_kwargs={"specs": self.specs, "streaming": True})
        return stream.shuffle(seed=self.seed + epoch, buffer_size=self.buffer_size)

    def _examples(self) -> Iterator[Example]:
        """Usable examples, epoch after epoch. The stats count the first epoch's records once, however often
        the stream is read again."""
        epoch = 0
        while True:
            usable = 0
            for i, row in enumerate(self._records(epoch)):
                new = epoch == 0 and i >= self._counted
                ex = self.encoder.encode_record(Record(json.loads(row["data"]), row["where"]), row["format"],
                                                self.stats if new else EncodeStats())
                if new:
                    self._counted = i + 1
                if ex is None:
                    continue
                usable += 1
                yield ex
            if usable == 0:
                raise UserError("data.train: the stream has no usable records after tokenization; raise data.max_length or check the data")
            epoch += 1

    def take(self, start: int, end: int) -> list[Example]:
        """The examples at stream positions ``start .. end-1`` (read on from the last call, or again from the start)."""
        a, b, cached = self._last
        if a <= start and end <= b:
            return cached[start - a : end - a]
        if self._it is None or start < self._pos:
            self._it, self._pos = self._examples(), 0
        while self._pos < start:
            next(self._it)
            self._pos += 1
        out = [next(self._it) for _ in range(end - start)]
        self._pos = end
        self._last = (start, end, out)
        return out

    def head(self, n: int) -> list[Example]:
        """The first ``n`` examples of the stream (its first epoch's order), read on their own."""
        out = []
        for ex in ExampleStream(self.encoder, self.specs, self.seed, self.buffer_size)._examples():
            if len(out) >= n:
                break
            out.append(ex)
        return out

    def __getitem__(self, i):
        if isinstance(i, slice) and (i.start or 0) == 0 and i.stop is not None and i.step in (None, 1):
            return self.head(i.stop)
        raise TypeError("a stream is read in order: use take(start, end) or a slice from the start")
