"""Many keys of an ``shm`` table at once, in numpy: encode them, find their entries.

``get_many``/``set_many`` use these to work without a per-key Python loop
over the table: int keys (a numpy integer array, or a list of Python ints)
are encoded and hashed as arrays (CRC-32 by table lookup, byte by byte, for
all keys together); other keys are encoded one by one, and from there on
everything is arrays again. Finding entries probes the index for all keys
together, one round per probe step, and compares key bytes with one gather.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from . import layout as L
from .build import exclusive_cumsum, gather_ranges
from .codec import encode_key


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1)
    return table.astype(np.uint32)


_CRC = _crc_table()


def crc32_rows(rows: np.ndarray, start: int) -> np.ndarray:
    """``zlib.crc32(row, start)`` of every row of a 2-D uint8 array."""
    crc = np.full(len(rows), start ^ 0xFFFFFFFF, dtype=np.uint32)
    for i in range(rows.shape[1]):
        crc = _CRC[(crc ^ rows[:, i]) & 0xFF] ^ (crc >> 8)
    out: np.ndarray = crc ^ np.uint32(0xFFFFFFFF)
    return out


class KeyBatch:
    """Keys encoded as the table stores them: kinds, hashes, and their bytes, each key
    starting on an 8-byte word of ``blob`` (zero-padded), as on the table's heap."""

    __slots__ = ("n", "kinds", "hashes", "blob", "wstart", "lens", "keys")

    def __init__(self, keys: Any, kinds: np.ndarray, hashes: np.ndarray, blob: np.ndarray,
                 wstart: np.ndarray, lens: np.ndarray):
        self.keys, self.n = keys, len(kinds)
        self.kinds, self.hashes, self.blob = kinds, hashes, blob
        self.wstart, self.lens = wstart, lens

    def key(self, i: int) -> Any:
        k = self.keys[i]
        return k.item() if isinstance(k, np.generic) else k


def encode_keys(keys: Any) -> KeyBatch:
    """Encode ``keys`` (a sequence, or a numpy integer array); TypeError for a bad key."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu" and keys.ndim == 1:
        if keys.dtype == np.uint64 and len(keys) and keys.max() > np.iinfo(np.int64).max:
            return _encode_each(keys.tolist())
        return _encode_ints(keys.astype("<i8"), keys)
    keys = list(keys)
    if keys and set(map(type, keys)) == {int}:
        try:
            ints = np.array(keys, dtype="<i8")
        except OverflowError:
            return _encode_each(keys)
        return _encode_ints(ints, keys)
    return _encode_each(keys)


def _encode_ints(ints: np.ndarray, keys: Any) -> KeyBatch:
    n = len(ints)
    rows = ints.view(np.uint8).reshape(n, 8)
    return KeyBatch(keys, np.full(n, L.K_INT, dtype=np.int64), crc32_rows(rows, L.K_INT),
                    rows.reshape(-1), np.arange(n, dtype=np.int64), np.full(n, 8, dtype=np.int64))


def _encode_each(keys: list[Any]) -> KeyBatch:
    kinds, hashes, lens, parts = [], [], [], []
    for key in keys:
        kind, kb = encode_key(key)
        kinds.append(kind)
        hashes.append(zlib.crc32(kb, kind))
        lens.append(len(kb))
        parts.append(kb + b"\0" * (-len(kb) % 8))
    lens_a = np.array(lens, dtype=np.int64)
    words = (lens_a + 7) // 8
    return KeyBatch(keys, np.array(kinds, dtype=np.int64), np.array(hashes, dtype=np.uint32),
                    np.frombuffer(b"".join(parts), dtype=np.uint8), exclusive_cumsum(words),
                    lens_a)


def has_duplicates(batch: KeyBatch) -> bool:
    if batch.n < 2:
        return False
    if (batch.lens == 8).all() and (batch.kinds == batch.kinds[0]).all():  # one word per key
        words = np.sort(batch.blob.view("<i8"))
        return bool((words[1:] == words[:-1]).any())
    seen = {(k, batch.blob[w * 8:w * 8 + n].tobytes())
            for k, w, n in zip(batch.kinds.tolist(), batch.wstart.tolist(), batch.lens.tolist())}
    return len(seen) < batch.n


def locate(g: L.Generation, batch: KeyBatch) -> np.ndarray:
    """The entry of each key in generation ``g`` (-1 where absent); the lock is held."""
    n = batch.n
    found = np.full(n, -1, dtype=np.int64)
    if n == 0 or g.q[L.H_LIVE] == 0:
        return found
    index, ents, heap = g.index(), g.entries(), g.heap()
    isize = len(index)
    pos = batch.hashes.astype(np.int64) % isize
    pending = np.arange(n, dtype=np.int64)
    for _ in range(isize):
        if not pending.size:
            break
        e = index[pos[pending]].astype(np.int64)
        keep = e != L.EMPTY  # an empty slot ends the probe: absent
        at = np.nonzero(e >= 0)[0]
        cand, ce = pending[at], e[at]
        meta = ents["meta"][ce]
        ok = ((ents["hash"][ce] == batch.hashes[cand]) & (ents["klen"][ce] == batch.lens[cand])
              & (((meta >> 8) & 0xFF) == batch.kinds[cand]) & ((meta & L.LIVE) != 0))
        at, cand, ce = at[ok], cand[ok], ce[ok]
        if cand.size:
            same = _same_words(heap.view(np.uint64), ents["koff"][ce].astype(np.int64),
                               batch.blob.view(np.uint64), batch.wstart[cand],
                               (batch.lens[cand] + 7) // 8)
            found[cand[same]] = ce[same]
            keep[at[same]] = False
        pending = pending[keep]
        pos[pending] = (pos[pending] + 1) % isize
    return found


def _same_words(a: np.ndarray, astart: np.ndarray, b: np.ndarray, bstart: np.ndarray,
                words: np.ndarray) -> np.ndarray:
    """For each i: a[astart[i]:+words[i]] == b[bstart[i]:+words[i]] (keys are zero-padded
    to whole 8-byte words on the heap and in a batch, so words compare like bytes)."""
    if (words == 1).all():  # ints, and str/bytes keys of up to 8 bytes
        eq: np.ndarray = a[astart] == b[bstart]
        return eq
    same = np.ones(len(words), dtype=bool)
    nonempty = words > 0
    if nonempty.any():
        w = words[nonempty]
        differ = a[gather_ranges(astart[nonempty], w)] != b[gather_ranges(bstart[nonempty], w)]
        same[nonempty] = np.add.reduceat(differ, exclusive_cumsum(w), dtype=np.int64) == 0
    return same
