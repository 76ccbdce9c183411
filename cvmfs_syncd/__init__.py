"""cvmfs-syncd: publish staging directories and S3 prefixes into CernVM-FS repositories."""

__version__ = "0.1.0"
