"""1x1 linear layer over the channel (last) axis: a 1x1 convolution on a channels-last grid."""


def forward(x, W, b):
    """y = x Wᵀ + b over the last axis.

    x (..., C), W (D, C) as torch's conv/linear weight (out, in), b (D,) -> y (..., D).
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)                       # P,C
    y = x2 @ W.T + b                            # P,D  (one BLAS gemm)
    return y.reshape(x.shape[:-1] + (W.shape[0],)), (x2, W, x.shape)


def backward(dy, cache):
    """-> (dx, dW, db)."""
    x2, W, xshape = cache
    dy2 = dy.reshape(-1, W.shape[0])            # P,D
    dx = (dy2 @ W).reshape(xshape)
    dW = dy2.T @ x2
    db = dy2.sum(axis=0)
    return dx, dW, db


def backward_params(dy, cache):
    """-> (dW, db) only, for layers whose input needs no gradient (frozen features)."""
    x2, W, _ = cache
    dy2 = dy.reshape(-1, W.shape[0])
    return dy2.T @ x2, dy2.sum(axis=0)
