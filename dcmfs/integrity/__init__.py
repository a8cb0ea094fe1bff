"""Proving and mending a store without FUSE and without the filesystem core: verify, fsck, repair (salvage of damaged files and unnamed objects) and the index rebuild."""
