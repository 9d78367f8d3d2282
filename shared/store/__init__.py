"""The job store: Perstack's on-disk layout, each message stored once, one committer per step.

`jobs.py` holds the store's logic (`JobStore`); `backend.py` the contract of the places it keeps files in,
`local.py` and `s3.py` those places, `flush.py` the grouped disk flushes the local one uses.
"""

from shared.store.backend import Append, Backend, StoreError
from shared.store.jobs import JobStore, Listing, open_backend
from shared.store.local import LocalBackend

__all__ = ["Append", "Backend", "JobStore", "Listing", "LocalBackend", "StoreError", "open_backend"]
