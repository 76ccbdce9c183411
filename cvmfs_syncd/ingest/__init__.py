"""Tarball drops, pure: which names are drops, checking an archive, writing the tar for
``cvmfs_server ingest``, and planning the replacement of a base's previous content."""
