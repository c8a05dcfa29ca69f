"""The ``shm`` backend: a crash-safe hash table in shared memory. The default.

Features
--------
- No server: every process maps the table (``NAME@ctl`` and ``NAME@gN`` in the
  user's private runtime dir, ``/dev/shm/shareit-UID``, mode 0600) and reads it
  directly. Keys: str, bytes, int and tuples of these,
  hashed with CRC-32 of a canonical encoding (the same in every interpreter;
  never ``hash()``), full key stored. Values: any picklable object; ints,
  floats, str, bytes, None and bools are stored unboxed.
- ``value_type="float64"`` (or ``int64``, ...): numeric values inline, and
  bulk numeric access through numpy with one lock: :meth:`ShmMapping.get_many`,
  :meth:`ShmMapping.set_many`, :meth:`ShmMapping.values_array`.
- Reads never take or wait for the writer lock, and never see a write that
  has not committed: a version per entry, a transaction word, and, while a
  writer (running, stopped or dead) is inside a transaction, its undo
  journal's pre-images laid over the data (:mod:`.read`). Snapshots,
  iteration and ``len`` validate one numpy copy the same way. A process
  caches what it read and re-validates it with two word reads (the epoch, on a
  cache line of its own, and the entry's version), so a repeated read costs
  about 3x a plain Python ``__getitem__``; a value another process changed is
  re-read from its entry without a hash probe.
- Writes (``d[k] = v``, ``del``, ``pop``) run as one flat locked step: the value
  is encoded once, a key this process placed is found from a per-process
  cache, the undo journal is written in one copy. A rewritten value of up to
  63.5 KB reuses its key's heap room in place (journaled); a larger one is
  appended.
- Writers take a robust, process-shared pthread mutex in the control segment
  (futex-based; ``flock`` where robust mutexes are missing): when its holder
  dies the next writer gets it, rolls back the dead writer's undo journal and
  goes on, so every key holds its old or its new value.
- Grows without limit: a full table, or one that is mostly deleted entries or
  dead heap bytes, is rebuilt into a new generation segment that attached
  processes follow (2.25x per rebuild below 32k entries, 1.5x above, up to 8x that when
  it grows back after a compaction; the writer
  keeps its key -> entry slots); ``capacity`` is only the starting size. A
  rewritten key keeps its heap room: a value of up to 63.5 KB that fits it is
  written in place (journaled), one that does not is appended with half its size
  to spare.
- The owner's ``close()`` or exit removes the segments unless ``persist=True``.
- A handle holds no file descriptor (the ``flock`` fallback keeps one per
  process and segment), and a handle dropped without ``close()`` unmaps its
  segments when it is garbage collected: a worker may receive any number of
  handles. Segments are allocated in full when created, so a full runtime dir
  raises :class:`~shareit.errors.CapacityError` instead of SIGBUS; a
  generation's heap is sized from the live bytes (1.5x), and a process caches at
  most ``CACHE_BYTES`` of the values it read.

Configuration
-------------
``shareit.open("feats", backend="shm", value_type="float64", capacity=100_000)``;
in ``shareit.toml``::

    [mappings.feats]
    backend = "shm"
    value_type = "float64"

or ``SHAREIT_BACKEND=shm``. Lock-free reads rely on x86-64 store and load
ordering; on other machines single-key reads take the lock.

Modules
-------
``layout`` the format of the segments (start here) · ``codec`` key and value
encoding · ``segments`` creating, mapping and releasing segment files ·
``table`` the :class:`~.table.Table`: one process's view and every locked step
(put, delete, recover, the one generation switch) · ``journal`` the undo journal ·
``lock`` the writer lock · ``fastpath`` the commonest writes done flat, pinned by
tests to the Table's steps · ``read`` lock-free reads of one key · ``copies``
lock-free whole-table copies · ``cache`` the per-process read cache · ``build``
vectorised generation builds · ``many`` many keys at once in numpy · ``numeric``
``get_many``/``set_many`` · ``diagnostics`` ``verify``/``info``/the lock holder ·
``mapping`` the :class:`ShmMapping` that holds a ``Table``.
"""

from .mapping import ShmMapping

__all__ = ["ShmMapping"]
