"""The feature file and what derives from it: ``feats.npy`` (N, h, w, C) read through a memory map
(``store``), its ``feats.json`` schema (``meta``), the KNN table of images (``knn``), synthetic
DINO-like features with a known hierarchy (``synthetic``, the demo data) and the Dask runner
(``distributed``) that extraction and the KNN table share."""
