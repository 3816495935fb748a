"""Storage backends behind :class:`msg.persistence.Store`.

Theory of operation
-------------------
:mod:`.index` holds the delivery state (ready, in flight, settling; topic positions
and cursors) that both single-node backends share. :class:`MemoryStore` is that
index alone; :class:`FileStore` adds per-queue and per-topic logs on disk
(:mod:`.records` for the line format, :mod:`.segments` for the files,
:mod:`.commit` for group commit, :mod:`.filenames` for safe directory names,
:mod:`.fs` as the one seam to the file system, :mod:`.lostfound` for keeping
damaged files aside). :mod:`.check` verifies and repairs a data directory offline
(``msg check``).

Nothing here imports the protocol, the core, the broker or the client.
"""

from msg.storage.filestore import FileStore
from msg.storage.memory import MemoryStore

__all__ = ["FileStore", "MemoryStore"]
