"""What the queue backend's hub and its replicas share: the change messages and the
words file.

A **change** is one message ``(seq, effects)``: the change number and the list of
``(key, stored value)`` effects one request made, in order. A stored value is never
a tuple of a str (``_codec.pack`` makes plain values or ``(bytes,)``), so these
markers stand in for a value:

- ``(key, REMOVED)``: ``key`` was deleted;
- ``(None, CLEARED)``: everything was deleted;
- ``(items, UPDATED)``: one ``update()``; ``items`` is the dict of its stored values.

A replica's first message on subscribing is ``(seq, data)`` instead: a snapshot of
every stored value at change ``seq``.

**The words file**, ``STEM@seq`` (8-byte words, shared memory): ``W_SEQ`` the last
published change number, ``W_SHUT`` 1 once the hub is shutting down (destroy, or its
owner died). The hub publishes ``W_SEQ`` before it pushes the change (see
``_queue_hub``); a replica compares it with what it has applied before every read.
"""

from __future__ import annotations

import mmap
import os

from .. import _runtime

REMOVED = ("<removed>",)
CLEARED = ("<cleared>",)
UPDATED = ("<updated>",)
W_SEQ = 0
W_SHUT = 1
WORDS_SIZE = 4096


def words_path(stem: str) -> str:
    return _runtime.path(stem, "seq")


def create_words(stem: str) -> None:
    """The words file, zeroed: created exclusively, never through a symlink."""
    path = words_path(stem)
    remove_words(stem)  # a dead owner's, in our own private dir
    fd = _runtime.open_private(path, os.O_RDWR, create=True)
    try:
        os.ftruncate(fd, WORDS_SIZE)
    finally:
        os.close(fd)


def map_words(path: str) -> tuple[mmap.mmap, memoryview]:
    """The words file mapped, and a view of it as 8-byte words (release the view before
    closing the map). FileNotFoundError once the hub has removed it."""
    fd = _runtime.open_private(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, WORDS_SIZE)
    finally:
        os.close(fd)
    return mm, memoryview(mm).cast("Q")


def remove_words(stem: str) -> None:
    try:
        os.unlink(words_path(stem))
    except FileNotFoundError:
        pass
