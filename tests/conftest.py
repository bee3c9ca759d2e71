"""Test set-up: without a GPU, Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so
it is set here, before setok_kernels is imported.
"""

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import setok_kernels  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
