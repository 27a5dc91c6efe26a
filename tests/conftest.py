import os

import torch

# Two cores on CI: keep torch from oversubscribing them and keep results reproducible.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny checkpoint set in the official layout, as `flux-weights random --preset tiny` writes it."""
    from weights_tools.random_weights import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0, dtype="float32")


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """The tiny checkpoint loaded as a FluxModels (transformer, autoencoder, text encoders)."""
    from fluxspace import load_models

    return load_models(tiny_checkpoint.transformer)


@pytest.fixture
def fresh_dynamo():
    """No compiled code or graph counts carried over from another test (tests/compile_probe.py counts them)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
