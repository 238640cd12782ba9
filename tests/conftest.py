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
