import os
import tempfile

import numpy as np
import pytest
import torch

# Two cores on CI: keep torch from oversubscribing when pytest runs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Caches (chosen backends and training precisions, ONNX exports) of this test session only, also
# for the CLI subprocesses: a choice cached by an earlier session must not change what tests see.
os.environ.setdefault("RESUNET_CACHE", tempfile.mkdtemp(prefix="resunet-test-cache-"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
