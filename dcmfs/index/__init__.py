"""The index: the LMDB schema and its transactions (index), the sealed journal
(journal), snapshots and the journal archive (snapshots).

Everything above this layer imports these names from the package, not from
its modules, so the modules can be reshaped without touching the callers.
"""

from .index import JOURNAL_NAME, SEALED, Index, Inode, Txn, read_stats

__all__ = ["JOURNAL_NAME", "SEALED", "Index", "Inode", "Txn", "read_stats"]
