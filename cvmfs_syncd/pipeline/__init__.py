"""The publish pipeline of one repository, one stage a module.

observe (``cvmfs_syncd.sources``) → :mod:`plan` (pure) → :mod:`prepare` (objects, outside the
transaction) → :mod:`place` (inside the transaction) → publish and settle (``lane``), with
:mod:`recovery` deciding what a restart does with an unfinished batch.
"""
