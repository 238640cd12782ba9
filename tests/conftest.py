import os

import pytest
import torch

# The suite runs on 2 CPU cores in CI; never touch the network (no model hub is reachable).
os.environ.setdefault("WEAKCLIP_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: small tensors run faster so, and two OpenMP threads on a busy
    2-core runner can run 10-40x slower. Modules use it with ``pytestmark = pytest.mark.usefixtures(...)``
    or as an argument of their own module-scoped fixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
