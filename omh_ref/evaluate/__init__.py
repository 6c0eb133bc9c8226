"""A code becomes a mask and a mask a score: codes and cluster predictions (``predict``), STEGO's
metrics with Hungarian matching (``metrics``), the linear probe (``probe``), the dense CRF
(``crf``), the learned hierarchy (``hierarchy``), pictures (``pictures``) and the ``omh-ref eval``
job (``job``)."""
