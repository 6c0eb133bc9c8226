"""The commands that chain stages, on the floor above them: ``evaluate`` (``omh-ref eval``:
checkpoint + features -> scores, masks, pictures), ``seeds`` (train and evaluate over seeds,
mean ± std), ``segmenter`` and ``segment`` (image -> backbone -> head -> mask, ``omh-ref
segment``), ``recipe`` (a data set's whole protocol) and ``demo`` (the offline demo)."""
