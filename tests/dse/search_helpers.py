"""Transitional: ``tests/dse/test_search.py`` still imports ``OVERRIDES`` and ``tiny_checkpoint`` from here.

They now live in ``tests/dse/conftest.py`` as the fixtures ``search_overrides`` and ``tiny_checkpoint``;
once ``test_search.py`` takes those fixtures, delete this file.
"""

from tests.dse.conftest import SEARCH_OVERRIDES as OVERRIDES
from tests.dse.conftest import _tiny_checkpoint as tiny_checkpoint

__all__ = ["OVERRIDES", "tiny_checkpoint"]
