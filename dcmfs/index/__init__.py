"""The index: its schema and key encodings (schema), the LMDB environment
with checkpoints and replay (index), one operation's typed accessors (txn),
the sealed journal (journal), snapshots and the journal archive (snapshots).

Everything above this layer imports these names from the package, not from
its modules, so the modules can be reshaped without touching the callers.
"""

from .index import Index, index_sealer, read_damage, sealed_aad
from .keygen import index_key, rekey_index
from .schema import JOURNAL_NAME, SEALED, Inode, read_meta, read_stats
from .txn import Txn
from .witness import Witness

__all__ = ["JOURNAL_NAME", "SEALED", "Index", "Inode", "Txn", "Witness", "index_key",
           "index_sealer", "rekey_index", "read_damage", "read_meta", "read_stats", "sealed_aad"]
