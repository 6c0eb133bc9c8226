"""The peers' released checkpoints, key by key: which tensors of a STEGO or a SmooSeg Lightning
checkpoint, or of HP's plain ``torch.save`` dict, are omh-ref's head, cluster probe, teacher, linear
probe and backbone, and what their stored hyper-parameters say (``omh-ref import``,
:mod:`omh_ref.jobs.imports`; the file is read by :mod:`omh_ref.jobs.torch_file`). No torch here.

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

**HP**, github.com/hynnsk/HP @ 8913644 (MIT; abbreviated as docs/hp_reading.md does, §2, §3, §8,
§10: ``R`` run.py, ``EV`` eval.py, ``CU`` utils/common_utils.py, ``BD`` build.py, ``SM``
model/STEGO.py, ``DF`` model/dino/DinoFeaturizer.py, ``LU`` utils/layer_utils.py, ``J`` the training
files json/server/{cocostuff,cityscapes,potsdam}.json, whose keys sit on the same lines):

* not Lightning's: a plain dict of ``torch.save`` (CU 12-42): ``epoch``, ``iter``, ``best_epoch``,
  ``best_iter``, ``best`` (the selection metric, R 276-277), the state dicts
  ``net_model_state_dict``, ``linear_model_state_dict``, ``cluster_model_state_dict`` and the
  three optimisers' (None: run.py saves with ``model_only=True``, R 282-286). HP loads the three
  state dicts strictly (EV 95-99, R 309-312), and so does the import: a key missing or left over is
  refused. Their keys are named here ``<entry>.<key>`` (``net_model_state_dict.cluster1.0.weight``);
* ``net_model`` is ``STEGOmodel.net`` (BD 14-24, SM 28-29), a ``DinoFeaturizer``: ``model.*`` DINO's
  ViT under DINO's key names (DF 15-17; HP's copy hands back the attention before its softmax,
  which changes no weight), the head ``cluster1.0.*`` (C -> D) and ``cluster2.0.*``,
  ``cluster2.2.*`` (C -> C, **ReLU**, C -> D; DF 68-71, 120-128), the code their sum (DF 188-193);
  the moving-average head ``ema_model1.0.*``, ``ema_model2.0.*``, ``ema_model2.2.*`` (DF 73-86),
  the hp base's teacher ``EW1`` ... ``Eb3``. DINO's ViT only (DF 26-35), ``cluster2`` always
  (DF 82 copies it into the EMA head);
* ``cluster_model`` a ``ClusterLookup``, ``clusters`` (n_classes + extra_clusters, D) (SM 33, LU 6-12),
  predicting the argmax of the normalised inner products (LU 18-28, R 380-382);
* ``linear_model`` a Conv2d D -> n_classes (SM 34), on the code upsampled to the labels (R 365, 378);
* not in the file: ``project_head`` (R 69-71; drawn as the hp base draws a new one), the reference
  pools (R 107, 145), and every setting: those are HP's JSON files', taken from
  :data:`HP_SETTINGS` for a named data set, else the hp base's defaults (COCO-Stuff's), said so.

Released checkpoints were trained by each peer's own code; a checkpoint whose head, probe or
backbone keys are missing, or whose stored settings ask for another model (STEGO's
``dino_feat_type: KK``, a feature pyramid), is refused in one line naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core import bases
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
    teacher: dict = field(default_factory=dict)   # omh-ref teacher head key -> peer key (HP's EMA head)
    strict: bool = False      # a key of no part imported is refused (HP loads strictly), not noted
    article: str = "a"        # before the title in messages


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
_NET = "net_model_state_dict."
HP = Peer(
    name="hp", title="HP", repo="hynnsk/HP", commit="8913644608c09fc004807d5c175aaceb424b3ab4",
    marks=(_NET + "cluster1.0.weight", "cluster_model_state_dict.clusters"),
    head={"W1": _NET + "cluster1.0.weight", "b1": _NET + "cluster1.0.bias", "W2": _NET + "cluster2.0.weight",
          "b2": _NET + "cluster2.0.bias", "W3": _NET + "cluster2.2.weight", "b3": _NET + "cluster2.2.bias"},
    centres={"M0": "cluster_model_state_dict.clusters"},
    probe=("linear_model_state_dict.weight", "linear_model_state_dict.bias"),
    activation="relu", dropout=0.1,                                  # DF 127, DF 24
    backbone=_NET + "model.",
    teacher={"EW1": _NET + "ema_model1.0.weight", "Eb1": _NET + "ema_model1.0.bias",
             "EW2": _NET + "ema_model2.0.weight", "Eb2": _NET + "ema_model2.0.bias",
             "EW3": _NET + "ema_model2.2.weight", "Eb3": _NET + "ema_model2.2.bias"},
    strict=True, article="an")
PEERS = {p.name: p for p in (STEGO, SMOOSEG, HP)}
# HP's file (CU 29-42): the three state dicts, the bookkeeping, the optimisers' states (None with
# model_only, R 286). Another entry is refused: a later layout, whose parts the import would drop.
HP_STATES = ("net_model_state_dict", "linear_model_state_dict", "cluster_model_state_dict")
HP_SAVED = ("epoch", "iter", "best_epoch", "best_iter", "best")
HP_OPTIMISERS = ("net_optimizer_state_dict", "linear_optimizer_state_dict", "cluster_optimizer_state_dict")
# HP's settings per data set, which its checkpoint does not hold, in omh-ref's names (J: ema_m J:35,
# tau J:25, alpha J:26, rho J:27, pool_size J:34, renew_interval J:31, warmup J:36; docs/hp_reading.md
# §9), with what the data set fixes: n_classes (dataset/data.py lines 486, 498, 510), the backbone's
# width (model_type J:47: ViT-S 384, ViT-B 768, DF 64-67) and D (J:41).
HP_SETTINGS = {
    "cocostuff27": {"file": "json/server/cocostuff.json", "n_classes": 27, "in_dim": 384, "dim": 512,
                    "fields": {"ema_alpha": 0.99, "supcon_tau": 0.8, "consistency_weight": 0.05,
                               "denominator_share": 0.02, "pool_size": 2048, "renew_interval": 100, "warmup": 1000}},
    "cityscapes27": {"file": "json/server/cityscapes.json", "n_classes": 27, "in_dim": 384, "dim": 512,
                     "fields": {"ema_alpha": 0.999, "supcon_tau": 0.6, "consistency_weight": 0.05,
                                "denominator_share": 0.02, "pool_size": 2048, "renew_interval": 20, "warmup": 50}},
    "potsdam3": {"file": "json/server/potsdam.json", "n_classes": 3, "in_dim": 768, "dim": 256,
                 "fields": {"ema_alpha": 0.999, "supcon_tau": 0.4, "consistency_weight": 0.0,
                            "denominator_share": 1.0, "pool_size": 1024, "renew_interval": 20, "warmup": 100}},
}
HP_DEFAULT_DATASET = "cocostuff27"   # the hp base's DEFAULTS are COCO-Stuff's (omh_ref/core/bases/hp.py)
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
    step: int = 0                           # the training step it was saved at (Lightning's global_step, HP's iter)
    record: dict = field(default_factory=dict)   # the peer's own entries of import.json (HP's)
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
        raise InputError(f"{path}: neither a Lightning checkpoint (no 'state_dict'), nor HP's (no "
                         f"'{HP_STATES[0]}'), nor a state dict of tensors")
    _check_state(state, path, "its state dict")
    return state, lightning


def _check_state(state, path, what):
    for k, v in state.items():
        if not isinstance(k, str):
            raise InputError(f"{path}: {what} has the key {describe(k)}, not a string")
        if not isinstance(v, np.ndarray):
            raise InputError(f"{path}: {what}'s {clean(k)} is {describe(v)}, not a tensor")


def is_hp(obj) -> bool:
    """Whether a loaded checkpoint is HP's dict (CU 29-42) rather than Lightning's."""
    return isinstance(obj, dict) and "state_dict" not in obj and any(k in obj for k in HP_STATES)


def hp_state_of(obj, path) -> tuple:
    """(one state dict of HP's three, keys ``<entry>.<key>``; the bookkeeping it holds; the entries
    of the optimisers' states that are not None) of HP's checkpoint dict. An entry save_checkpoint
    does not write, or a state dict missing, is refused in one line naming it."""
    known = (*HP_STATES, *HP_SAVED, *HP_OPTIMISERS)
    extra = [k for k in obj if k not in known]
    if extra:
        raise InputError(f"{path}: an HP checkpoint with the entry {describe(extra[0])}, which HP's save_checkpoint "
                         f"does not write ({HP.repo} @ {HP.commit[:7]} utils/common_utils.py lines 29-42)")
    state = {}
    for name in HP_STATES:
        if name not in obj:
            raise InputError(f"{path}: an HP checkpoint without {name} (HP's eval.py loads it, lines 97-99)")
        sd = obj[name]
        if not isinstance(sd, dict):
            raise InputError(f"{path}: its {name} is {describe(sd)}, not a state dict")
        _check_state(sd, path, f"its {name}")
        state.update({f"{name}.{k}": v for k, v in sd.items()})
    saved = {k: plain(obj[k]) for k in HP_SAVED if k in obj}
    return state, saved, [k for k in HP_OPTIMISERS if obj.get(k) is not None]


def detect(state, path) -> Peer:
    """The peer whose keys ``state`` holds; an unknown layout is refused in one line."""
    for peer in (HP, SMOOSEG, STEGO):
        if any(k in state for k in peer.marks) or any(k.startswith(tuple(v.rsplit(".", 2)[0] + "." for v in
                                                                          peer.head.values())) for k in state):
            return peer
    first = ", ".join(clean(k, 60) for k in sorted(state)[:4]) or "no keys"
    raise InputError(f"{path}: an unknown checkpoint layout, neither STEGO's ({' / '.join(STEGO.marks)}), "
                     f"SmooSeg's ({' / '.join(SMOOSEG.marks)}) nor HP's ({HP_STATES[0]} ...); its keys begin {first}")


def _config_of(hp: dict) -> tuple:
    """(the stored config as a dict, n_classes or None) of Lightning's ``hyper_parameters``
    (``save_hyperparameters()`` of ``__init__(n_classes, cfg)``: TS 54 and 106 for STEGO, TS 21
    and 58 for SmooSeg)."""
    if not isinstance(hp, dict):
        return {}, None
    cfg = hp.get("cfg") if isinstance(hp.get("cfg"), dict) else {k: v for k, v in hp.items() if k != "n_classes"}
    n = hp.get("n_classes")
    return cfg, n if _count(n) else None


def _a(peer) -> str:
    """The peer's title after its article ("a STEGO", "an HP")."""
    return f"{peer.article} {peer.title}"


def _need(state, keys, peer, path):
    missing = [k for k in keys if k not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{path}: {_a(peer)} checkpoint without {', '.join(missing[:3])}{more} "
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


def convert(obj, path, dataset=None) -> Imported:
    """The peer's checkpoint ``obj`` (as :func:`omh_ref.jobs.torch_file.load` gives it) in
    omh-ref's terms; a one-line InputError for an unknown layout, a missing key (or, for HP, one
    left over) or a setting that asks for another model. ``dataset`` names HP's data set, whose
    settings (:data:`HP_SETTINGS`) its checkpoint does not hold."""
    saved, optimisers = {}, []
    if is_hp(obj):
        (state, saved, optimisers), peer, lightning = hp_state_of(obj, path), HP, {}
    else:
        state, lightning = state_dict_of(obj, path)
        peer = detect(state, path)
    if dataset is not None and peer is not HP:
        raise InputError(f"--dataset {clean(str(dataset), 40)}: names the settings an HP checkpoint does not hold; "
                         f"{path} is {peer.title}'s, which stores its own")
    hp = lightning.get("hyper_parameters")
    cfg, n_stored = _config_of(plain(hp if hp is not None else {}))
    if peer is STEGO:
        _refuse_setting(path, peer, cfg, "arch", ("dino",), "STEGO's other featurizer is a ResNet feature pyramid "
                                                          "(TS 65-67)")
    elif peer is SMOOSEG:
        _refuse_setting(path, peer, cfg, "arch", ("dino", "dinov2"), "SmooSeg's other featurizer is a ResNet "
                                                                    "feature pyramid (TS 27-29)")
    _refuse_setting(path, peer, cfg, "dino_feat_type", ("feat",), "its code reads the attention keys, not the "
                                                                "tokens omh-ref's features are (STEGO M 96-103)")
    # HP's head is always two-branch: DF 82 copies cluster2 into its moving-average head
    proj = "nonlinear" if peer is HP else cfg.get("projection_type", "nonlinear" if peer.head["W2"] in state
                                                                  else "linear")
    _refuse_setting(path, peer, {"projection_type": proj}, "projection_type", ("nonlinear", "linear"),
                    "no projection head (the code is the features, M 112-113)")
    head_keys = [peer.head[k] for k in (("W1", "b1", "W2", "b2", "W3", "b3") if proj == "nonlinear" else ("W1", "b1"))]
    _need(state, head_keys + list(peer.centres.values()) + list(peer.probe or ()) + list(peer.teacher.values()),
          peer, path)

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
    for key, src in peer.teacher.items():       # HP's moving-average head: the head's shapes
        want = params[key[1:]].shape
        params[key] = _conv(path, state, src, *want) if len(want) == 2 else _f32(state[src])
        _shape(path, src, params[key], want)
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
        raise InputError(f"{path}: {K} clusters for {n_classes} classes (n_classes + extra_clusters, "
                         f"{'SM 33' if peer is HP else 'TS 75 / TS 38'})")

    used = head_keys + list(peer.centres.values()) + list(peer.probe or ()) + list(peer.teacher.values())
    backbone = {k[len(peer.backbone):]: v for k, v in state.items() if k.startswith(peer.backbone)}
    ignored = sorted(k for k in state if k not in used and not k.startswith(peer.backbone))
    unknown = [k for k in ignored if not k.startswith(peer.known)]
    notes = []
    if unknown and peer.strict:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise InputError(f"{path}: {_a(peer)} checkpoint with {clean(unknown[0], 80)}{more}, which {peer.title}'s "
                         f"model does not have (it loads its checkpoints strictly, eval.py lines 97-99)")
    if peer.strict and not backbone:
        raise InputError(f"{path}: {_a(peer)} checkpoint without {peer.backbone}* (DINO's ViT, which "
                         f"{peer.title} loads with the head, eval.py line 97)")
    if unknown:
        notes.append(f"note: {path}: {len(unknown)} key(s) of no part omh-ref imports, left out: "
                     f"{', '.join(clean(k, 60) for k in unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
    family = None
    if backbone:
        arch = cfg.get("arch")
        family = "dinov2" if peer is not HP and (arch == "dinov2" or (arch is None and "mask_token" in backbone)) \
            else "dino"
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
    if peer is HP:
        config, record = _hp_config(C, D, K, n_classes, dataset, path, notes)
        kept = {}
        for k in HP_SAVED:        # CU 31-34 and 41: counts, and the selection metric (R 276-277)
            v = saved.get(k)
            if v is not None and (_number(v) if k == "best" else _count(v)):
                kept[k] = v
            elif k in saved:
                notes.append(f"note: {path}: its {k} is {describe(v)}, left out")
        record = {"saved": _json_safe(kept), **record}
        if optimisers:
            record["entries_left_out"] = optimisers
            notes.append(f"note: {path}: its {', '.join(optimisers)} left out (an import is evaluated, not resumed)")
        step = kept.get("iter", 0)
    else:
        config = _config(peer, cfg, C, D, K, path)
        record, step = {"lightning": _json_safe(life)}, life.get("global_step", 0)
    base = bases.get(peer.name)
    if hasattr(base, "new_params"):   # the base's own trainable parameters a peer does not save (HP's project_head)
        for k, v in base.new_params(config, np.random.default_rng(0), np.float32).items():
            params.setdefault(k, v)
    return Imported(peer=peer, params=params, config=config, n_classes=int(n_classes), probe=probe,
                    backbone=backbone or None, family=family, hints=hints, hyper_parameters=_json_safe(cfg),
                    lightning=_json_safe(life), step=int(step), record=record, used=used, ignored=ignored,
                    notes=notes)


def _hp_config(C, D, K, n_classes, dataset, path, notes) -> tuple:
    """(omh-ref's config of an HP checkpoint: the hp base alone, its sizes from the weights, the
    rest HP's settings for ``dataset`` or, unnamed, the hp base's defaults (COCO-Stuff's); the
    record of where they came from). A data set of another class count is refused; another D or
    backbone width is noted (HP released a Cityscapes ViT-B/8 for which its repository holds no
    settings, README lines 59 and 68)."""
    fields = with_base_defaults({"base": "hp", "omh": False, "in_dim": int(C), "dim": int(D), "levels": (int(K),),
                                 "head_activation": HP.activation, "dropout": HP.dropout})
    if dataset is None:
        src = HP_SETTINGS[HP_DEFAULT_DATASET]
        notes.append(f"note: {path}: HP's checkpoint holds no training settings (they are its {HP.repo} "
                     f"json/server/*.json); assumed the hp base's defaults, COCO-Stuff's ({src['file']}): "
                     + ", ".join(f"{k} {fields[k]}" for k in src["fields"])
                     + f"; --dataset {' | '.join(HP_SETTINGS)} takes that data set's (evaluation reads none of them)")
    else:
        if dataset not in HP_SETTINGS:
            raise InputError(f"--dataset {clean(str(dataset), 40)}: HP's settings are known for "
                             f"{', '.join(HP_SETTINGS)} (its json/server files)")
        src = HP_SETTINGS[dataset]
        if n_classes != src["n_classes"]:
            raise InputError(f"{path}: its linear probe predicts {n_classes} classes; HP's {dataset} has "
                             f"{src['n_classes']} (not its checkpoint, or another --dataset)")
        for what, want, got in (("D", src["dim"], D), ("backbone width", src["in_dim"], C)):
            if want != got:
                notes.append(f"note: {path}: its {what} is {got}, {src['file']} trains {want}; its other "
                             f"settings are taken as they are there")
        fields.update(src["fields"])
    try:
        config = Config(**fields)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise InputError(f"{path}: no valid omh-ref config ({clean(' '.join(str(e).split()), 300)})") from None
    record = {"settings": {"dataset": dataset or HP_DEFAULT_DATASET, "assumed": dataset is None,
                           "source": f"{HP.repo}@{HP.commit[:7]} {src['file']}",
                           "values": {k: getattr(config, k) for k in src["fields"]}},
              "not_in_file": {"PW, Pb": "project_head (run.py lines 69-71; not saved, lines 282-286): drawn "
                                        "as the hp base draws a new one (torch's Linear default, seed 0); evaluation does not "
                                        "read it",
                              "pool_ag, pool_sp": "the reference pools (run.py lines 107, 145): not saved; an "
                                                  "import is evaluated, not resumed"}}
    return config, record


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
