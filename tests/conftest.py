"""Fixtures. Helpers live in helpers.py (tests import it by name: this folder is on sys.path)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import STOCK  # noqa: E402


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
