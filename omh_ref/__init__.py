"""omh-ref: a reference implementation of OMH (Optimally Matched Hierarchy) for unsupervised
semantic segmentation, as reconstructed from the paper's abstract (its code and method section were
not available), with every forward and backward pass written by hand in NumPy (and run unchanged on
CuPy arrays)."""
__version__ = "0.1.0"

