"""Shared test settings: small thread count (2-core CI machines), W&B never online."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on shared cores
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CAPTIONING_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is as fast, and no OpenMP spin-waits between threads when other
# processes share the 2 cores (several times slower). Subprocess tests set OMP_NUM_THREADS=1.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
