"""Test configuration.

Triton kernels run on CPU tensors under the Triton interpreter, which must be switched on before
triton is first imported: without a CUDA device we set TRITON_INTERPRET=1 here (a value already
in the environment wins).
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def poisoned():
    """Every buffer the fused backends allocate is NaN-filled first (HMX_KERNELS_POISON=1)."""
    from hmx_kernels import config

    config.set_poison(True)
    try:
        yield
    finally:
        config.set_poison(False)
