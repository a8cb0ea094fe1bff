"""dcmfs: a transparent encrypted, compressing FUSE filesystem for medical images."""

__version__ = "0.1.0"
