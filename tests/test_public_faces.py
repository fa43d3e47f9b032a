"""``client`` and ``server`` export a small public face; every name in ``__all__`` resolves."""

import importlib

import pytest


@pytest.mark.parametrize("package", ["client", "server"])
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)

    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is not None


@pytest.mark.parametrize("package", ["client", "server"])
def test_unknown_name_is_an_attribute_error(package):
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = importlib.import_module(package).nope
