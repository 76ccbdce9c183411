"""Everything that knows CernVM-FS: its commands (the one door, ``server.py``), its files,
formats and storage, the gateway publishers go through."""
