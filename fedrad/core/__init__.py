"""The contracts every other package shares; imports nothing of fedrad's own above it.

- :mod:`~fedrad.core.config`: the run config and the node config, parsed once into frozen
  dataclasses with range checks.
- :mod:`~fedrad.core.keys`: record and metric keys of the messages between coordinator and sites.
- :mod:`~fedrad.core.errors`: the small exception tree.
- :mod:`~fedrad.core.durable`: atomic, fsynced writes for run directories, caches and ledgers.
- :mod:`~fedrad.core.evalsums`: evaluation sums as fixed-layout integer counts (for SecAgg+).
- :mod:`~fedrad.core.sites`: which folder of a simulated consortium is which site.
"""
