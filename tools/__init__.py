"""Development tools (not shipped): a package so that tools/tests imports them as tools.<name>."""
