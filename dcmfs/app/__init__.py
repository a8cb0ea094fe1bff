"""The application: command line, mount and daemon, admin commands, status, systemd install and instance files, metrics, logging setup."""
