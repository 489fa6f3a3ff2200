"""FileStore's tunable sizes, in one place: what bounds its memory and the size of its reads.

Read as ``sizes.NAME`` at the moment of use (never copied into another module), so a test can
shrink them all by patching this one module and hit every window and record boundary with
small journals.
"""

from __future__ import annotations

#: Target body size of the records a rewrite writes. Opening a journal, compacting it and
#: reading messages back hold about one record at a time, so this bounds their memory (an
#: operation larger than this gets a record of its own).
SNAPSHOT_CHUNK = 1 << 20
#: Opening a journal reads it in pieces of this size (or one record, if that is larger).
SCAN_CHUNK = 1 << 20
#: Reading messages back merges the operations wanted into positioned reads of at most this
#: many bytes, bridging gaps of at most ``READ_GAP`` bytes (other records, removed messages):
#: a queue is written in order, so a page of it is usually one read.
READ_SPAN = 1 << 20
READ_GAP = 64 << 10
#: The queued-message arrays are rebuilt without their removed entries once those number more
#: than this and more than half the live ones (see :class:`~.index.Index`).
INDEX_SLACK = 1024
#: With fsync on, a journal is extended this many bytes at a time with zeros that the records
#: then overwrite (see ``session.OpenSession.append``): an ``fdatasync`` of a write inside the
#: file's size skips the file-size metadata an appending write makes it commit (measured on
#: ext4: ~95 µs instead of ~137 µs). 16 KiB is ~100 records of a sequential publisher, so the
#: one slower sync per extension costs well under 1 % of a record.
PREALLOC_CHUNK = 16 << 10
