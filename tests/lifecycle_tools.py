"""Moved to tests/support/lifecycle.py; this name stays until every importer uses the new one."""
from tests.support.lifecycle import *  # noqa: F401,F403
