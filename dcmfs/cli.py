"""``python -m dcmfs.cli``: kept because installed units run it (dcmfs@.service);
the command line itself is :mod:`dcmfs.app.cli`."""

import sys

from .app.cli import main, mount_helper_main  # noqa: F401  (the entry points)

if __name__ == "__main__":
    sys.exit(main())
