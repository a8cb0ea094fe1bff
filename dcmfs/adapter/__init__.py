"""The FUSE adapter: the only code that imports mfusepy; it translates requests to calls on the core and exceptions to errno."""
