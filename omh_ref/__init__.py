"""omh-ref: the reference implementation of OMH (Optimally Matched Hierarchy) for unsupervised
semantic segmentation, with every forward and backward pass written by hand in NumPy (and run
unchanged on CuPy arrays)."""
__version__ = "0.1.0"
