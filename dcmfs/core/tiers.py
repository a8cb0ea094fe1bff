"""Hot and cold DICOM-coded files (issue 17): fresh studies decode fast,
the archive stays dense.

Radiologists read a study in the days after it is acquired; priors are read
rarely.  The re-encoder first codes a DICOM file's frames in the hot form
(:data:`dcmfs.storage.codec.IMAGE_HOT`: blosc2, byte-shuffled LZ4HC, which
decodes ~10x as fast as HTJ2K and ~30x as fast as JPEG XL; HTJ2K where it
saves more than ~28 % of a band; zstd where that is cheaper), and records the file
as *hot* with the time it was coded.  Once a hot file has not been read for ``hot_days``
(``-o hot_days=``, 0: no hot tier), the re-encoder codes it again with the
configured image codecs (JPEG XL under the cost rule: the dense, *cold*
form), through the same verified path as any re-encoding: the new extents
are decoded and compared with the file's bytes before they replace the old.

Reads are noted in memory only (no index write on the read path); when a
hot file is due and was read within ``hot_days``, its hot time moves on in
the index instead.  A remount forgets the reads: a file read shortly before
then may turn cold early, which costs decode speed, never data.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..storage.codec import IMAGE, IMAGE_HOT
from ..storage.dicom import BAND_BYTES, HOT_BAND_BYTES

HOT, COLD = "hot", "cold"
DAY = 86400.0


class Tiers:
    """Which coding a re-encoded file gets, and which hot files are due."""

    def __init__(self, hot_days: float, clock: Callable[[], float] = time.time) -> None:
        self.hot_s = max(0.0, hot_days) * DAY
        self.clock = clock
        self._read: dict[int, float] = {}
        self._lock = threading.Lock()
        #: monotonic time of the next look for due files
        self.next_look = 0.0

    @property
    def on(self) -> bool:
        return self.hot_s > 0

    @property
    def look_every(self) -> float:
        """Seconds between looks for due files (an eighth of the hot time,
        between 1 s and 10 min)."""
        return min(600.0, max(1.0, self.hot_s / 8))

    def image_codec(self, cooling: bool) -> int:
        """The codec request for a frame: the hot tier's
        (:data:`~dcmfs.storage.codec.IMAGE_HOT`) for a hot coding, else every
        configured image codec (:data:`~dcmfs.storage.codec.IMAGE`)."""
        return IMAGE_HOT if self.on and not cooling else IMAGE

    def band_bytes(self, cooling: bool) -> int:
        """About how many bytes of a frame's rows go into one band (one
        object): the hot tier's :data:`~dcmfs.storage.dicom.HOT_BAND_BYTES`
        (fewer objects to read; its codec decodes a band quickly anyway),
        else :data:`~dcmfs.storage.dicom.BAND_BYTES`."""
        return HOT_BAND_BYTES if self.on and not cooling else BAND_BYTES

    def fields(self, cooling: bool) -> dict:
        """What the file's content record says of its tier."""
        if not self.on:
            return {}
        return {"tier": COLD} if cooling else {"tier": HOT, "hot_at": int(self.clock())}

    def read(self, ino: int) -> None:
        """``ino`` was opened for reading (no index write)."""
        with self._lock:
            self._read[ino] = self.clock()

    def due(self, txn, start: int = 0, limit: int = 1000
            ) -> tuple[list[int], list[tuple[int, float]], int | None]:
        """Of at most ``limit`` files from inode ``start`` on: (hot files not
        read for ``hot_days``: to code cold; (file, when it was read) of hot
        files past their time that were read meanwhile: their hot time moves
        on to that read; where the next slice starts, None at the end)."""
        now = self.clock()
        cool, keep = [], []
        with self._lock:
            reads = dict(self._read)
        after = None
        for n, (ino, content) in enumerate(txn.iter_content(start)):
            if n == limit:
                after = ino
                break
            if content.get("tier") != HOT or content.get("hot_at", 0) + self.hot_s > now:
                continue
            read = reads.get(ino, 0)
            if read + self.hot_s > now:
                keep.append((ino, read))
            else:
                cool.append(ino)
        with self._lock:
            for ino in cool + [k for k, _ in keep]:
                if self._read.get(ino) == reads.get(ino):
                    self._read.pop(ino, None)
        return cool, keep, after

