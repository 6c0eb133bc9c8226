"""The peers' released checkpoints, key by key: which tensors of a STEGO or a SmooSeg Lightning
checkpoint are omh-ref's head, cluster probe, teacher, linear probe and backbone, and what their
stored hyper-parameters say (``omh-ref import``, :mod:`omh_ref.jobs.imports`; the file is read by
:mod:`omh_ref.jobs.torch_file`). No torch here.

Both peers' Lightning modules are ``LitUnsupervisedSegmenter``; their state dicts are its
attributes' parameters, named by attribute path (torch's ``nn.Module.state_dict``).

**STEGO**, github.com/mhamilton723/STEGO @ eb4d6b5 (``TS`` src/train_segmentation.py, ``M``
src/modules.py, ``VT`` src/dino/vision_transformer.py, ``EV`` src/eval_segmentation.py):

* ``net`` is a ``DinoFeaturizer`` (TS 68-69): ``net.model`` the DINO ViT (M 27-29, ``vit_small`` /
  ``vit_base`` of VT 266-277, no classifier head at ``num_classes=0``, VT 161), its features the
  last block's normalised tokens without the class token (M 90-97, VT 225-237: ``feat``);
  ``net.cluster1`` a ``Sequential`` of one 1x1 Conv2d C -> D (M 68, 73-75): ``net.cluster1.0.*``;
  ``net.cluster2`` Conv2d C -> C, **ReLU**, Conv2d C -> D (M 69-71, 77-81): ``net.cluster2.0.*``,
  ``net.cluster2.2.*``; the code is their sum (M 108-111), D = ``dim`` (TS 59-62);
* ``cluster_probe.clusters`` (n_classes + extra_clusters, D) (TS 75; ``ClusterLookup`` M 134-140),
  predicting the argmax of the normalised inner products (M 147-153; EV 131: log_softmax(2 ·) then
  argmax, the same argmax);
* ``linear_probe.weight`` (n_classes, D, 1, 1) and ``.bias`` (TS 76), a 1x1 conv on the code
  (EV 130);
* not imported: ``train_cluster_probe.clusters`` (TS 73, never used), ``decoder.*`` (TS 78, the
  reconstruction loss's), the metrics' states (TS 80-88) where a torchmetrics version saved them.

**SmooSeg**, github.com/mc-lan/SmooSeg @ 1eecdec (``TS`` train_segmentation.py, ``M`` modules.py;
non-commercial licence: described, no code taken):

* ``net`` a ``DinoFeaturizer`` or, with ``arch: dinov2``, a ``DinoV2Featurizer`` (TS 30-33):
  ``net.model`` the DINO ViT (M 16, loaded from DINO's release, M 33-34) or torch.hub's DINOv2
  (M 75-82, its last layer's normalised patch tokens, M 93);
* ``projection`` (TS 37) the same two branches with **SiLU** (M 107-121): ``projection.cluster1.0.*``,
  ``projection.cluster2.0.*``, ``projection.cluster2.2.*``;
* ``prediction`` (TS 38, n_classes + extra_clusters centres): ``prediction.local_clusters`` (the
  student, M 145) and ``prediction.global_clusters`` (the teacher, M 154-157), predictions from
  the teacher (M 172, TS 123-126); ``prediction.sigma`` (off by default, M 148-152) scales the
  student only (M 174-175) and is not imported; SmooSeg has no linear probe.

Released checkpoints were trained by each peer's own code; a checkpoint whose head, probe or
backbone keys are missing, or whose stored settings ask for another model (STEGO's
``dino_feat_type: KK``, a feature pyramid), is refused in one line naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.config import Config, with_base_defaults
from ..core.errors import InputError
from ..core.stego_names import NAMES as STEGO_NAMES
from .torch_file import clean, describe, plain


@dataclass(frozen=True)
class Peer:
    name: str                 # omh-ref's base of the same method
    title: str
    repo: str
    commit: str
    marks: tuple              # keys that say a state dict is this peer's
    head: dict                # omh-ref head key -> peer key (conv weight or bias)
    centres: dict             # omh-ref centres key -> peer key
    probe: tuple | None       # (weight, bias) of a released linear probe
    activation: str           # the head's nonlinearity
    dropout: float            # the head's Dropout2d (recorded in the config; training only)
    known: tuple = ()         # prefixes of keys that are not imported, on purpose
    backbone: str = "net.model."


_METRICS = ("cluster_metrics.", "linear_metrics.", "test_cluster_metrics.", "test_linear_metrics.")
STEGO = Peer(
    name="stego", title="STEGO", repo="mhamilton723/STEGO", commit="eb4d6b521740bd4265681b353547f2ffca65d673",
    marks=("net.cluster1.0.weight", "cluster_probe.clusters"),
    head={"W1": "net.cluster1.0.weight", "b1": "net.cluster1.0.bias", "W2": "net.cluster2.0.weight",
          "b2": "net.cluster2.0.bias", "W3": "net.cluster2.2.weight", "b3": "net.cluster2.2.bias"},
    centres={"M0": "cluster_probe.clusters"},
    probe=("linear_probe.weight", "linear_probe.bias"),
    activation="relu", dropout=0.1,                                  # M 80, M 33
    known=("train_cluster_probe.", "decoder.", *_METRICS))
SMOOSEG = Peer(
    name="smooseg", title="SmooSeg", repo="mc-lan/SmooSeg", commit="1eecdec75247ce448574a1bbe2dc9f693be99712",
    marks=("projection.cluster1.0.weight", "prediction.local_clusters"),
    head={"W1": "projection.cluster1.0.weight", "b1": "projection.cluster1.0.bias",
          "W2": "projection.cluster2.0.weight", "b2": "projection.cluster2.0.bias",
          "W3": "projection.cluster2.2.weight", "b3": "projection.cluster2.2.bias"},
    centres={"M0": "prediction.local_clusters", "G": "prediction.global_clusters"},
    probe=None, activation="silu", dropout=0.2,                      # M 120, M 105
    known=("prediction.sigma", *_METRICS))
PEERS = {p.name: p for p in (STEGO, SMOOSEG)}
# SmooSeg's DINOv2 sizes (M 75-82) in omh-ref's names (omh_ref/extract/archs.py)
DINOV2_SIZES = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant": "vit_giant2"}


@dataclass
class Imported:
    """A peer's checkpoint in omh-ref's terms (host float32 arrays)."""
    peer: Peer
    params: dict
    config: Config
    n_classes: int
    probe: dict | None                      # {"W": (n_classes, D), "b": (n_classes,)}
    backbone: dict | None                   # the ViT's state dict, prefix stripped (arrays)
    family: str | None                      # "dino" | "dinov2"
    hints: dict = field(default_factory=dict)   # what the hyper-parameters say of the backbone
    hyper_parameters: dict = field(default_factory=dict)
    lightning: dict = field(default_factory=dict)
    used: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def state_dict_of(obj, path) -> tuple:
    """(state dict, Lightning's other entries) of a loaded checkpoint: a Lightning checkpoint
    (``state_dict`` beside ``hyper_parameters``, ``epoch`` ...) or a bare state dict. Every key of
    the state dict is a string and every value an array (what ``nn.Module.state_dict`` holds), or
    the file is refused in one line naming the first that is not."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state, lightning = obj["state_dict"], obj
    elif isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        state, lightning = obj, {}
    else:
        raise InputError(f"{path}: neither a Lightning checkpoint (no 'state_dict') nor a state dict of tensors")
    for k, v in state.items():
        if not isinstance(k, str):
            raise InputError(f"{path}: its state dict has the key {describe(k)}, not a string")
        if not isinstance(v, np.ndarray):
            raise InputError(f"{path}: its state dict's {clean(k)} is {describe(v)}, not a tensor")
    return state, lightning


def detect(state, path) -> Peer:
    """The peer whose keys ``state`` holds; an unknown layout is refused in one line."""
    for peer in (SMOOSEG, STEGO):
        if any(k in state for k in peer.marks) or any(k.startswith(tuple(v.rsplit(".", 2)[0] + "." for v in
                                                                          peer.head.values())) for k in state):
            return peer
    first = ", ".join(clean(k, 60) for k in sorted(state)[:4]) or "no keys"
    raise InputError(f"{path}: an unknown checkpoint layout, neither STEGO's ({' / '.join(STEGO.marks)}) nor "
                     f"SmooSeg's ({' / '.join(SMOOSEG.marks)}); its keys begin {first}")


def _config_of(hp: dict) -> tuple:
    """(the stored config as a dict, n_classes or None) of Lightning's ``hyper_parameters``
    (``save_hyperparameters()`` of ``__init__(n_classes, cfg)``: TS 54 and 106 for STEGO, TS 21
    and 58 for SmooSeg)."""
    if not isinstance(hp, dict):
        return {}, None
    cfg = hp.get("cfg") if isinstance(hp.get("cfg"), dict) else {k: v for k, v in hp.items() if k != "n_classes"}
    n = hp.get("n_classes")
    return cfg, n if _count(n) else None


def _need(state, keys, peer, path):
    missing = [k for k in keys if k not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{path}: a {peer.title} checkpoint without {', '.join(missing[:3])}{more} "
                         f"(its keys as {peer.repo} @ {peer.commit[:7]} names them)")


def _dims(path, key, a, n):
    """``a`` has ``n`` dimensions (before its sizes are read from it)."""
    if a.ndim != n:
        raise InputError(f"{path}: {key} has shape {tuple(a.shape)}, expected {n} dimensions")
    return a.shape


def _shape(path, key, a, want):
    if tuple(a.shape) != tuple(want):
        raise InputError(f"{path}: {key} has shape {tuple(a.shape)}, expected {tuple(want)}")


def _f32(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def _conv(path, state, key, out, inn):
    """A 1x1 Conv2d weight (out, in, 1, 1) as omh-ref's (out, in) matrix."""
    w = state[key]
    _shape(path, key, w, (out, inn, 1, 1))
    return _f32(w[:, :, 0, 0])


def _refuse_setting(path, peer, cfg, key, allowed, why):
    value = cfg.get(key)
    if value is not None and not (isinstance(value, str) and value in allowed):
        raise InputError(f"{path}: its stored {key} = {describe(value)}: {why}; omh-ref imports {peer.title}'s "
                         f"{' / '.join(map(repr, allowed))} only")


def convert(obj, path) -> Imported:
    """The peer's checkpoint ``obj`` (as :func:`omh_ref.jobs.torch_file.load` gives it) in
    omh-ref's terms; a one-line InputError for an unknown layout, a missing key or a setting that
    asks for another model."""
    state, lightning = state_dict_of(obj, path)
    peer = detect(state, path)
    hp = lightning.get("hyper_parameters")
    cfg, n_stored = _config_of(plain(hp if hp is not None else {}))
    if peer is STEGO:
        _refuse_setting(path, peer, cfg, "arch", ("dino",), "STEGO's other featurizer is a ResNet feature pyramid "
                                                          "(TS 65-67)")
    else:
        _refuse_setting(path, peer, cfg, "arch", ("dino", "dinov2"), "SmooSeg's other featurizer is a ResNet "
                                                                    "feature pyramid (TS 27-29)")
    _refuse_setting(path, peer, cfg, "dino_feat_type", ("feat",), "its code reads the attention keys, not the "
                                                                "tokens omh-ref's features are (STEGO M 96-103)")
    proj = cfg.get("projection_type", "nonlinear" if peer.head["W2"] in state else "linear")
    _refuse_setting(path, peer, {"projection_type": proj}, "projection_type", ("nonlinear", "linear"),
                    "no projection head (the code is the features, M 112-113)")
    head_keys = [peer.head[k] for k in (("W1", "b1", "W2", "b2", "W3", "b3") if proj == "nonlinear" else ("W1", "b1"))]
    _need(state, head_keys + list(peer.centres.values()) + list(peer.probe or ()), peer, path)

    D, C = _dims(path, peer.head["W1"], state[peer.head["W1"]], 4)[:2]
    params = {"W1": _conv(path, state, peer.head["W1"], D, C), "b1": _f32(state[peer.head["b1"]])}
    _shape(path, peer.head["b1"], params["b1"], (D,))
    if proj == "nonlinear":
        params["W2"] = _conv(path, state, peer.head["W2"], C, C)
        params["b2"] = _f32(state[peer.head["b2"]])
        params["W3"] = _conv(path, state, peer.head["W3"], D, C)
        params["b3"] = _f32(state[peer.head["b3"]])
        _shape(path, peer.head["b2"], params["b2"], (C,))
        _shape(path, peer.head["b3"], params["b3"], (D,))
    else:   # STEGO's projection_type: linear (T 35): the second branch is absent, exactly zero here
        params.update(W2=np.zeros((C, C), np.float32), b2=np.zeros(C, np.float32),
                      W3=np.zeros((D, C), np.float32), b3=np.zeros(D, np.float32))
    K = _dims(path, peer.centres["M0"], state[peer.centres["M0"]], 2)[0]
    for key, src in peer.centres.items():
        _shape(path, src, state[src], (K, D))
        params[key] = _f32(state[src])

    probe = None
    if peer.probe:
        wk, bk = peer.probe
        n_classes = _dims(path, wk, state[wk], 4)[0]
        probe = {"W": _conv(path, state, wk, n_classes, D), "b": _f32(state[bk])}
        _shape(path, bk, probe["b"], (n_classes,))
    else:
        extra = cfg.get("extra_clusters") if isinstance(cfg.get("extra_clusters"), int) else 0
        n_classes = n_stored if n_stored else K - extra
    if n_stored is not None and n_stored != n_classes:
        raise InputError(f"{path}: its stored n_classes {n_stored} differs from the {n_classes} of "
                         f"{peer.probe[0] if peer.probe else 'its centres'}")
    if not 1 <= n_classes <= K:
        raise InputError(f"{path}: {K} clusters for {n_classes} classes (n_classes + extra_clusters, TS 75 / TS 38)")

    config = _config(peer, cfg, C, D, K, path)
    used = head_keys + list(peer.centres.values()) + list(peer.probe or ())
    backbone = {k[len(peer.backbone):]: v for k, v in state.items() if k.startswith(peer.backbone)}
    ignored = sorted(k for k in state if k not in used and not k.startswith(peer.backbone))
    unknown = [k for k in ignored if not k.startswith(peer.known)]
    notes = []
    if unknown:
        notes.append(f"note: {path}: {len(unknown)} key(s) of no part omh-ref imports, left out: "
                     f"{', '.join(clean(k, 60) for k in unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    family = None
    if backbone:
        arch = cfg.get("arch")
        family = "dinov2" if arch == "dinov2" or (arch is None and "mask_token" in backbone) else "dino"
    hints = {"size": _hint(cfg.get("model_type")), "patch": _hint(cfg.get("dino_patch_size")) if family == "dino"
             else None}
    if family == "dinov2" and hints["size"] is not None:
        hints["size"] = DINOV2_SIZES.get(hints["size"], hints["size"])
    life = {}      # Lightning's own record, kept where it is what Lightning writes
    for k, fits in (("epoch", _count), ("global_step", _count), ("pytorch-lightning_version", _text)):
        v = plain(lightning.get(k))
        if v is not None and fits(v):
            life[k] = v
        elif v is not None:
            notes.append(f"note: {path}: its Lightning {k} is {describe(v)}, left out")
    return Imported(peer=peer, params=params, config=config, n_classes=int(n_classes), probe=probe,
                    backbone=backbone or None, family=family, hints=hints, hyper_parameters=_json_safe(cfg),
                    lightning=_json_safe(life), used=used, ignored=ignored, notes=notes)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 63


def _text(v):
    return isinstance(v, str) and len(v) <= 64


def _hint(v):
    """A stored setting compared with the backbone's weights: a string or an int as stored, or
    anything else as its description (which then does not match)."""
    return v if v is None or isinstance(v, str) or _count(v) else describe(v)


def _config(peer, cfg, C, D, K, path) -> Config:
    """omh-ref's config of the imported model: the base alone (``omh = false``) with the stored
    hyper-parameters that name omh-ref's fields (the values the peer trained with; evaluation reads
    only the head's activation, the levels and the base)."""
    fields = {"base": peer.name, "omh": False, "in_dim": int(C), "dim": int(D), "levels": (int(K),),
              "head_activation": peer.activation, "dropout": peer.dropout}
    if peer is STEGO:
        scale = cfg.get("correspondence_weight", 1.0) if _number(cfg.get("correspondence_weight")) else 1.0
        for key, (table, name) in STEGO_NAMES.items():            # omh_ref/core/stego_names.py
            v = cfg.get(key)
            if table != "model" or name in ("dim",) or v is None:
                continue
            if name.startswith("weight_") and _number(v):
                v = v * scale                                      # TS 179-181
            fields[name] = v
    else:
        fields = with_base_defaults(fields)
        for key, name in (("temperature", "teacher_tau"), ("alpha", "ema_alpha"), ("pos_intra_shift", "shift_intra"),
                          ("neg_inter_shift", "shift_neg"), ("pointwise", "pointwise")):   # TC 33-41, M 244
            if cfg.get(key) is not None:
                fields[name] = cfg[key]
    try:
        return Config(**fields)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise InputError(f"{path}: its stored hyper-parameters give no valid omh-ref config "
                         f"({clean(' '.join(str(e).split()), 300)})") from None


def _json_safe(obj, depth=0):
    """``obj`` (a :func:`plain` value, bounded in size) as JSON can write it."""
    if depth > 32:
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 16 else f"array{tuple(obj.shape)}"
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, int) and not isinstance(obj, bool) and obj.bit_length() > 64:
        return describe(obj)       # json.dumps writes an int through str(), which refuses past 4300 digits
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return describe(obj, 200)
