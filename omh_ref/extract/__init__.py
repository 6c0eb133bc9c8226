"""An image becomes a feature: data set readers (``datasets``, ``classes``), STEGO's crops
(``images``), the ONNX backbone run with onnxruntime (``backbone``) and the resumable extraction
job that writes ``feats.npy`` / ``labels.npy`` / ``feats.json`` (``job``)."""
