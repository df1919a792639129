"""Fixtures. Helpers live in helpers.py (tests import it by name: pytest's pythonpath has tests/)."""

import pytest
import torch

from helpers import STOCK


@pytest.fixture(scope="session")
def stock_models():
    """One stock model per family, built once (CPU, random weights, seed 0)."""
    out = {}
    for kind, build in STOCK.items():
        torch.manual_seed(0)
        out[kind] = build()
    return out


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))
