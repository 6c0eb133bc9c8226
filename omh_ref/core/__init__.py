"""The differentiable core, shared by every stage: array backend (``backend``), errors, atomic
files (``files``), the configuration (``config``), ops with Sinkhorn among them (``ops``), losses
(``losses``), the projection head (``head``), the model's objective (``model``), Adam (``optim``)
and the gradient checker with its suite (``gradcheck``, ``checks``). Nothing here knows about
files of features, images or checkpoints."""
