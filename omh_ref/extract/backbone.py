"""The backbone: an ONNX ViT run with onnxruntime (no torch), and its input contract.

Input: float32 (B, 3, R, R) images, ``/255`` then ImageNet mean/std (:func:`normalize`, bit for
bit torchvision's ``ToTensor`` + ``Normalize``); output: patch features (B, h, w, C) with
``R / h`` a whole patch size (``omh-ref export`` writes such files), the model's first output.
A model exported with ``omh-ref export --attention`` has a second output, ``attention`` (B, n, n),
n = h * w: the last block's pre-softmax attention logits averaged over heads, patch tokens only
(``omh-ref extract --attention`` reads it). Sessions are cached per process, so Dask workers
reuse theirs across chunks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.backend import strict_device_active
from ..core.errors import InputError
from ..core.files import file_sha256

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
ATTENTION_OUTPUT = "attention"     # the second output's name (omh-ref export --attention)
ATTENTION_WHAT = "last block, pre-softmax q.k/sqrt(d) per head, mean over heads, patch rows x patch columns"


def normalize(rgb: np.ndarray) -> np.ndarray:
    """(..., R, R, 3) uint8 -> (..., 3, R, R) float32: ToTensor (/255) and ImageNet mean/std."""
    x = rgb.astype(np.float32) / np.float32(255)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------
def providers(device: str) -> list:
    import onnxruntime as ort

    if device == "gpu" and not strict_device_active():   # the tests' stand-in GPU: arrays only, ORT on the CPU
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError("--device gpu: this onnxruntime has no CUDA provider (replace it with onnxruntime-gpu: "
                             "pip uninstall onnxruntime && pip install onnxruntime-gpu, on a machine with CUDA)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


_SESSIONS: dict = {}


def session(model, device="cpu", threads=None):
    """An onnxruntime session, cached per process (Dask workers reuse theirs across chunks)."""
    import onnxruntime as ort

    st = os.stat(model)
    key = (str(Path(model).resolve()), st.st_size, st.st_mtime_ns, device, threads)
    if key not in _SESSIONS:
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        try:
            _SESSIONS[key] = ort.InferenceSession(str(model), so, providers=providers(device))
        except InputError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise InputError(f"{model}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
    return _SESSIONS[key]


@dataclass
class Backbone:
    """What extraction needs to know of an .onnx backbone."""
    path: str
    sha256: str
    input_name: str
    resolution: int
    grid: tuple
    dim: int
    dynamic: bool = False    # the input's height and width are free (probed at ``resolution``)
    stated: dict = field(default_factory=dict)   # what the file says of itself (omh-ref export's metadata)
    output_name: str | None = None   # the features output (the first); None: the first, unnamed
    attention: bool = False          # the model has the attention output (omh-ref export --attention)

    @property
    def patch(self) -> int:
        return self.resolution // self.grid[0]

    def provenance(self) -> dict:
        """Which backbone this is (:mod:`omh_ref.features.provenance`): what the file states, else
        what its outputs show."""
        st = self.stated
        rand = st.get("omh_ref.random_init")
        # files exported before the family was recorded were all DINO (v1), with no registers
        family = st.get("omh_ref.family") or ("dino" if st.get("omh_ref.arch") else None)
        regs = st.get("omh_ref.registers") or ("0" if family == "dino" else None)
        return {"name": Path(self.path).stem, "family": family, "arch": st.get("omh_ref.arch"), "patch": self.patch,
                "registers": None if regs is None else int(regs), "dim": self.dim,
                "weights_sha256": st.get("omh_ref.weights_sha256"),
                "random_init": None if rand is None else rand == "true", "onnx_sha256": self.sha256,
                "resolution": self.resolution}


def inspect_model(model, resolution=None, device="cpu", threads=None) -> Backbone:
    """Read the model's input/output contract; a mismatch with ``--resolution`` is an InputError."""
    sess = session(model, device, threads)
    ins = sess.get_inputs()
    if len(ins) != 1 or len(ins[0].shape) != 4:
        raise InputError(f"{model}: expected one input of shape (B, 3, H, W), got "
                         f"{[tuple(i.shape) for i in ins]}")
    b, c, h, w = ins[0].shape
    if ins[0].type != "tensor(float)":
        raise InputError(f"{model}: expected a float32 input, got {ins[0].type}")
    if isinstance(b, int):
        raise InputError(f"{model}: expected a dynamic batch axis, got a fixed batch of {b} (export it with "
                         "omh-ref export)")
    if c != 3:
        raise InputError(f"{model}: expected 3 input channels, got {c}")
    fixed = [d for d in (h, w) if isinstance(d, int)]
    if fixed and (len(fixed) == 1 or h != w):
        raise InputError(f"{model}: expected a square input, got {h}x{w}")
    if fixed and resolution is not None and resolution != h:
        raise InputError(f"--resolution {resolution}: {model} takes {h} px inputs (export one at "
                         f"{resolution} with omh-ref export --resolution {resolution})")
    res = h if fixed else (resolution or 224)
    names = [o.name for o in sess.get_outputs()]
    ys = session_run(sess, model, ins[0].name, np.zeros((2, 3, res, res), np.float32), names)
    y = ys[0]
    if y.dtype.kind != "f":
        raise InputError(f"{model}: expected float features, got {y.dtype}")
    if y.ndim != 4 or y.shape[0] != 2 or y.shape[1] != y.shape[2] or res % y.shape[1]:
        raise InputError(f"{model}: expected patch features (B, h, w, C) with res/h a whole patch "
                         f"size, got {y.shape} for {res} px")
    stated = {k: v for k, v in sess.get_modelmeta().custom_metadata_map.items() if k.startswith("omh_ref.")}
    attention = ATTENTION_OUTPUT in names[1:]
    if attention:
        a, n = ys[names.index(ATTENTION_OUTPUT)], int(y.shape[1]) * int(y.shape[2])
        if a.shape != (2, n, n) or a.dtype.kind != "f":
            raise InputError(f"{model}: its '{ATTENTION_OUTPUT}' output has shape {a.shape}, expected (B, n, n) = "
                             f"(2, {n}, {n}) for its {y.shape[1]}x{y.shape[2]} grid (export it with omh-ref export "
                             "--attention)")
    return Backbone(str(model), file_sha256(model), ins[0].name, int(res), (int(y.shape[1]), int(y.shape[2])),
                    int(y.shape[3]), dynamic=not fixed, stated=stated, output_name=names[0], attention=attention)


def session_run(sess, model, input_name, x, outputs=None) -> list:
    """``sess.run(outputs, ...)``: the arrays of ``outputs`` (None: every output), with
    onnxruntime's failures as one line."""
    try:
        return sess.run(outputs, {input_name: x})
    except Exception as e:  # onnxruntime's own exception types (a bad graph, out of memory, ...)
        raise InputError(f"{model}: onnxruntime failed on a batch of shape {x.shape} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def run(sess, bb, x):
    """The features of batch ``x`` (B, h, w, C); only the features output is computed."""
    y = session_run(sess, bb.path, bb.input_name, x, None if bb.output_name is None else [bb.output_name])[0]
    if not np.isfinite(y).all():
        raise InputError(f"{bb.path}: the backbone produced NaN or inf features (a broken export?)")
    return y


def run_with_attention(sess, bb, x):
    """(features (B, h, w, C), attention logits (B, n, n) float32) of batch ``x``, one forward."""
    y, a = session_run(sess, bb.path, bb.input_name, x, [bb.output_name, ATTENTION_OUTPUT])
    if not (np.isfinite(y).all() and np.isfinite(a).all()):
        raise InputError(f"{bb.path}: the backbone produced NaN or inf features or attention (a broken export?)")
    return y, a.astype(np.float32, copy=False)
