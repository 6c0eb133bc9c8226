"""An image becomes a feature: data set readers (``datasets``, ``classes``), STEGO's crops
(``images``), the ONNX backbone run with onnxruntime (``backbone``) and the resumable extraction
job that writes ``feats.npy`` / ``labels.npy`` / ``feats.json`` (``job``), and for the HP base
``attn.npy`` (``attention``: HP's 3x3 attention window weights) and ``feats_aug.npy``
(``augment``: HP's photometric augmentation, one seeded draw per crop). ``omh-ref export`` makes the
ONNX backbone (``export_dino``, with ``archs``, ``checkpoints``, ``vit_layers``, ``vit_dinov2``,
``vit_dinov3``; all but ``archs`` need torch and are imported only to export)."""
