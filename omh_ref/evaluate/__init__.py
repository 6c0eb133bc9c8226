"""A code becomes a mask and a mask a score: codes and cluster predictions (``predict``), STEGO's
metrics with Hungarian matching (``metrics``, ``matching``), every level against its label
granularity (``granular``), the linear probe (``probe``), the dense CRF (``crf``), the learned
hierarchy (``hierarchy``), pictures (``pictures``) and validation during training
(``validation``). Scoring only: nothing here reads images or checkpoints; the jobs
(:mod:`omh_ref.jobs`) hand it what they read."""
