"""The publish pipeline of one repository, one stage a module.

observe (``cvmfs_syncd.sources``) → :mod:`plan` (pure) → :mod:`prepare` (objects, outside the
transaction) → :mod:`place` (inside the transaction) → :mod:`transaction` (open, publish,
abort), strung together for each batch by :mod:`batch`; :mod:`recovery` decides what a
restart does with an unfinished batch and :mod:`restart` does it; :mod:`one_shot` is
``cvmfs-syncd sync`` and :mod:`dry_run` its ``--dry-run``.
"""
