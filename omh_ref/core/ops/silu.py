"""Sigmoid-weighted linear unit (SiLU, "swish"): SmooSeg's projection head uses it where STEGO's
uses ReLU (torch.nn.SiLU)."""
from ..backend import get_array_module


def _sigmoid(x):
    """σ(x) = 1 / (1 + e^−x), computed as e^x / (1 + e^x) for x < 0 so that nothing overflows."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))                                  # in (0, 1]
    one = x.dtype.type(1)
    return xp.where(x >= 0, one / (one + e), e / (one + e))


def forward(x):
    """y = x σ(x) elementwise. -> (y, cache: σ(x) and x)."""
    s = _sigmoid(x)
    return x * s, (x, s)


def backward(dy, cache):
    """dx = dy σ(x) (1 + x (1 − σ(x)))."""
    x, s = cache
    one = s.dtype.type(1)
    return dy * s * (one + x * (one - s))
