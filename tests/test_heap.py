"""fedlit.heap: freed C-heap pages go back to the OS between clients (glibc malloc_trim)."""

from __future__ import annotations

import platform
import sys

import pytest

from fedlit import heap


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_free_memory_calls_malloc_trim_on_glibc():
    assert heap._malloc_trim() is not False
    assert isinstance(heap.release_free_memory(), bool)


def test_release_free_memory_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_TRIM", False)
    assert heap.release_free_memory() is False
