import contextlib
import os
import random

import pytest
import torch

# Fresh random inputs on every run; the seed is printed in the header so a failure can be replayed
# with ADAPEFT_TEST_SEED=<seed>.
SEED = int(os.environ.get("ADAPEFT_TEST_SEED", random.SystemRandom().randrange(2**31)))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CUDA tests skip)"
    return [f"adapeft test seed: {SEED} (ADAPEFT_TEST_SEED to replay)", f"torch {torch.__version__}, CUDA device: {cuda}"]


@pytest.fixture
def generator(request):
    """A torch.Generator seeded from the run seed and the test's name."""
    return torch.Generator().manual_seed(SEED + sum(map(ord, request.node.nodeid)))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def forbid_host_sync(active=True):
    """Inside, any operation that makes the host wait for the device raises (work queued before waits
    here first, so it is not counted)."""
    if not active:
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def model_syncs_allowed(loss_fn):
    """loss_fn with host synchronisations allowed and uncounted inside it: what the user's loss function does
    is the user's business (transformers' attention-mask check synchronises), not the probe's or the loop's."""
    def wrapped(model, batch):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return loss_fn(model, batch)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    return wrapped


def train_then_backward(model, optimizer, loss_fn, batch, steps):
    """`steps` optimizer steps, then one more backward pass: gradients and optimizer state as in the
    middle of a training run, ready to probe."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    optimizer.zero_grad()
    loss_fn(model, batch).backward()
