"""What the low-precision specs of the experts and the layers share: the devices they run on (CUDA
cases skip without a GPU; the GPU check runs them), the half dtypes, and one relative error."""
import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by the GPU check)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
HALF = [torch.bfloat16, torch.float16]


def rel_err(a, b):
    """``|a - b| / |b|`` in float64 (one number for a whole tensor: robust to single tiny entries)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
