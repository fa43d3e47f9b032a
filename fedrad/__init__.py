"""fedrad: federated learning for medical imaging across hospitals.

The package has two layers. :mod:`fedrad.core` is the bottom of the whole project: the
contracts that ``client``, ``server`` and ``privacy`` share (configuration, record keys,
errors, durable writes, evaluation sums, site listing). :mod:`fedrad.commands` is the top: the
``fedrad`` command, which drives ``client`` and ``server``. :mod:`fedrad.synth` and
:mod:`fedrad.npz_import` write site folders (synthetic or imported) and depend only on
:mod:`fedrad.core`. Nothing below the commands imports them; ``ARCHITECTURE.md`` draws the
layers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrad")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
