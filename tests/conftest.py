"""Shared test set-up: CPU only, no network, quiet warnings."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def toy():
    """The embedded CLIP (bundled weights), loaded once per test module."""
    from fedlit.backbones import load_backbone

    return load_backbone("fedlit-toy")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test's code path immediately."""

    def refuse(*args, **kwargs):
        raise OSError("network access blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
