"""Fixtures for the store's tests: real SQLite files in tmp_path.

A plain module, not a conftest.py: a second `conftest` module would shadow tests/conftest.py for
the tests that do `from conftest import ...`. Test modules import the fixtures from here.
"""
from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest

from store.database import open_database


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "iapo.db")


@pytest.fixture
def fresh_db(db_path):
    """An opened database (newest schema) on a new file."""
    db = open_database(db_path)
    yield db
    db.conn.close()
