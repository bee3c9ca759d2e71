"""Test set-up: the device under test, and Triton's interpreter where there is no GPU.

Op tests take the ``device`` fixture: "cuda" on a machine with a GPU (every
kernel then runs there: ``make test`` on the GPU machine tests the GPU code),
else "cpu" with TRITON_INTERPRET=1, under which the Triton kernels run in
Triton's interpreter. TRITON_INTERPRET must be set before any @triton.jit
function is created, so it is set here, before setok_kernels is imported.
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


def pytest_report_header(config):
    if DEVICE == "cuda":
        return f"setok device under test: cuda ({torch.cuda.get_device_name(0)})"
    return f"setok device under test: cpu (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')})"


@pytest.fixture
def device():
    """The device under test: "cuda" where present, else "cpu" (Triton interpreted)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
