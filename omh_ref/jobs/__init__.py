"""The commands that chain stages, on the floor above them: ``evaluate`` (``omh-ref eval``:
checkpoint + features -> scores, masks, pictures), ``seeds`` (train and evaluate over seeds,
mean ± std), ``segmenter`` and ``segment`` (image -> backbone -> head -> mask, ``omh-ref
segment``), ``recipe`` (a data set's whole protocol), ``demo`` (the offline demo), ``report``
(one HTML page of runs) and ``imports`` (``omh-ref import``: a peer's released checkpoint in, read
by ``torch_file`` with the layouts of ``peers``)."""
