import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the scripts run from the checkout (they are not installed); tests import them as python scripts/x.py does
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from alexnet.spec import AlexNetSpec  # noqa: E402


def pytest_configure(config):
    """The pytest process computes with 2 threads (CI's cores). Set here, not at import: the spawned gloo
    ranks import this module for ``tiny_spec`` after ``dist_worker.setup`` gave them 1 thread each, and
    an import-time setting took it back (4 ranks x 2 threads on 2 cores)."""
    torch.set_num_threads(2)


#: a deprecation warning line in a subprocess's output that is ours: it names a file of this project's library or
#: training code, or torch.distributed's wrapper of its deprecated collectives (which names itself, not the caller)
OWN_DEPRECATION = re.compile(r"(/parallel/|/alexnet/|/data/|train\.py|torch/distributed/c10d_logger\.py)"
                             r".*(FutureWarning|DeprecationWarning)")


def tiny_spec(groups: int, **overrides) -> AlexNetSpec:
    """A 32x32 AlexNet small enough for CPU tests; widths divide by 1, 2, 3 and 4."""
    kw = dict(groups=groups, num_classes=10, in_channels=1, input_size=32, conv_channels=[12, 24, 36, 36, 24],
              kernels=[3, 3, 3, 3, 3], strides=[1, 1, 1, 1, 1], paddings=[1, 1, 1, 1, 1], fc_widths=[48, 48],
              dropout=0.0, init="kaiming")
    kw.update(overrides)
    return AlexNetSpec(**kw)


def assert_close(actual, expected, msg=None):
    """fp32 equality to rtol 1e-5; the absolute floor (1e-6) scales with the tensor's largest entry,
    because gradients summed over many positions differ by float rounding in the last digits."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * max(1.0, expected.abs().max().item()),
                               msg=msg)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture
def root():
    return ROOT


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    """Config paths in tests are relative to the repository root, as in the README."""
    monkeypatch.chdir(ROOT)
