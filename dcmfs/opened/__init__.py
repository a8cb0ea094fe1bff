"""An opened store: what every command and the daemon open, check and close, and the procedure for a store that was not closed cleanly (recovery)."""
