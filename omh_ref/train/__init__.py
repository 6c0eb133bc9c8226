"""A feature becomes a code: the training loop (``loop``) and its checkpoints (``checkpoint``)."""
