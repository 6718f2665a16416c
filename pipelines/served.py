"""Which reader a query service serves, and the switch to a new one after an upgrade (pipelines/maintain.py).

A replica serves one ``Served``: a reader and the index of that reader's current memories. The store's
served-reader pointer (``ROOT/served.json``, ``MemoryStore.served``) names the reader to serve; the upgrade
job writes it, atomically, only once the new reader's memories account for every input, so the new set is
complete before any replica looks at it. Without a pointer a replica serves its configured ``--reader``.

The switch: a ``PointerWatch`` thread in each replica reads the pointer every ``reader_check_interval_s``. When it
names another reader, the replica loads that reader and indexes its memories beside the serving pair (requests
keep being answered meanwhile), then replaces ``Served`` in one assignment. A request takes the ``Served`` of the
moment it starts and uses it to the end (lookup, READ and response), so it is answered wholly by one reader from
that reader's memories: in-flight requests finish on the old reader, later ones start on the new. Replicas switch
independently, each within one interval (plus the load) of the pointer's change: two replicas may briefly serve
different readers, never one request two. A pointer that cannot be read, or names a reader whose fingerprint
differs from the pointer's, is logged and the replica keeps serving what it serves.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from gradmem import Reader
from gradmem.store import MemoryIndex, MemoryStore
from pipelines.storage import local_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One reader and the index of its memories (other readers' entries are kept only to name them in a 409)."""

    reader: Reader
    index: MemoryIndex
    uri: str

    @property
    def fingerprint(self) -> str:
        return self.reader.fingerprint


def load_served(uri: str, store: MemoryStore, s3_endpoint: str | None, device: str,
                expect: str | None = None) -> Served:
    """Load the reader at ``uri`` onto ``device`` and index its memories in ``store``. ``expect``: the fingerprint
    the pointer names; another one (the directory changed under the pointer) is a ValueError, nothing is swapped."""
    reader = Reader.from_pretrained(local_dir(uri, s3_endpoint), device=device)
    if expect is not None and reader.fingerprint != expect:
        raise ValueError(f"the served-reader pointer names reader {expect}, but the reader at its location is "
                         f"{reader.fingerprint}")
    index = MemoryIndex(store, fingerprint=reader.fingerprint)
    index.refresh()
    return Served(reader, index, uri)


def initial_reader(store: MemoryStore, configured: str) -> tuple[str, str | None]:
    """(location, expected fingerprint) of the reader a starting replica serves: the pointer's when the store has
    one (a restarted service stays on the upgraded reader), else the configured one."""
    pointer = store.served()
    if pointer is None:
        return configured, None
    if pointer["reader"] != configured:
        logger.info("the store's served-reader pointer names %s (%s): serving it rather than --reader %s",
                    pointer["reader"], pointer["fingerprint"], configured)
    return pointer["reader"], pointer["fingerprint"]


class PointerWatch:
    """A daemon thread that checks the store's pointer every ``interval_s`` and hands a newly loaded ``Served`` to
    ``swap``. ``current`` returns the fingerprint served now."""

    def __init__(self, store: MemoryStore, s3_endpoint: str | None, device: str, interval_s: float,
                 current: Callable[[], str], swap: Callable[[Served], None]):
        self.store, self.s3_endpoint, self.device, self.interval_s = store, s3_endpoint, device, interval_s
        self.current, self.swap = current, swap
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="served-reader-watch", daemon=True)

    def start(self) -> "PointerWatch":
        if self.interval_s > 0:
            self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a bad pointer or a failed load never stops the replica serving
                logger.exception("checking the served-reader pointer failed; still serving %s", self.current())

    def check(self) -> bool:
        """Switch when the pointer names another reader; True when it switched."""
        pointer = self.store.served()
        if pointer is None or pointer["fingerprint"] == self.current():
            return False
        logger.info("the served-reader pointer names %s (%s): loading it", pointer["reader"], pointer["fingerprint"])
        served = load_served(pointer["reader"], self.store, self.s3_endpoint, self.device,
                             expect=pointer["fingerprint"])
        self.swap(served)
        logger.info("now serving reader %s (%d documents)", served.fingerprint, len(served.index.entries))
        return True
