"""``omh-ref import``: a peer's released checkpoint (STEGO's or SmooSeg's Lightning ``.ckpt``, HP's
``torch.save`` dict ``.pth``) in, an omh-ref checkpoint out that ``eval`` and ``segment`` take as
they are, with the backbone it holds exported to ONNX beside it (docs/DECISIONS.md, "Importing the
peers' checkpoints").

Under ``--out DIR``:

* ``DIR/ckpt.npz``: omh-ref's checkpoint (:mod:`omh_ref.train.checkpoint`) of the peer's base
  alone (``base`` stego, smooseg or hp, ``omh = false``): the head (``W1 b1 W2 b2 W3 b3`` from the
  two branches' 1x1 convs), STEGO's and HP's cluster probe as ``M0`` (its n_classes +
  extra_clusters rows), or SmooSeg's student as ``M0`` and teacher as ``G`` (the predictor); HP's
  moving-average head as ``EW1`` ... ``Eb3`` and its ``project_head``, which HP does not save, drawn
  as the hp base draws it (``PW``, ``Pb``); STEGO's and HP's released linear probe as the arrays
  ``probe_W``, ``probe_b`` (``eval --stored-probe`` scores it); in ``info``: the import's record
  (the source file's sha256, the peer, the commit whose key names were read, the stored
  hyper-parameters, Lightning's epoch and step or HP's bookkeeping and the settings taken for it,
  the keys used and left out) and the backbone's provenance, so features of another backbone are
  refused;
* ``DIR/<name>_<resolution>.onnx`` and ``DIR/manifest.json``: the checkpoint's DINO (or SmooSeg's
  DINOv2) backbone, exported, checked against torch and recorded by ``omh-ref export``'s own code
  (:func:`omh_ref.extract.export_dino.export_checked`), one file per ``--resolution``;
* ``DIR/import.json``: the same record, readable without numpy.

The checkpoint is read by :mod:`.torch_file` (a restricted unpickler: nothing it names is run);
its keys are :mod:`.peers`'. torch is needed for the backbone's export only, and a checkpoint
holds one: without torch the import stops in one line naming ``omh-ref[torch]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.errors import InputError
from ..core.files import file_sha256, write_text
from ..core.lock import FolderLock
from ..features.provenance import FAMILY_TITLE
from ..train import checkpoint
from . import peers, torch_file

CHECKPOINT = "ckpt.npz"
RECORD = "import.json"
# The peers evaluate at 320 px (STEGO src/configs/eval_config.yml line 4, SmooSeg
# configs/eval_config.yaml line 4, HP build.py lines 187-205); a DINOv2 backbone (patch 14) takes
# 224, SmooSeg's DINOv2 setting (configs/train_config.yaml line 15 and train_segmentation.py lines
# 232-235).
EVAL_RESOLUTION = 320


@dataclass
class ImportOptions:
    """What ``omh-ref import`` takes (its argument and flags, by the same names)."""

    checkpoint: str
    out: str
    resolution: tuple = ()          # the backbone's export sizes; () = the peer's evaluation size
    overwrite: bool = False
    dataset: str | None = None      # HP's data set, whose settings its checkpoint lacks (peers.HP_SETTINGS)


def _needs_torch(path, why):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError(f"{path}: {why} needs torch; pip install 'omh-ref[torch]'") from None


def read(path, dataset=None) -> peers.Imported:
    """The peer checkpoint at ``path`` in omh-ref's terms (``dataset``: HP's data set); one-line
    InputErrors, whatever the file holds: the read and the conversion are one try, and an error no
    check foresaw (a crafted file is a hostile input) is reported by type and message, not as a
    traceback."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a STEGO or SmooSeg checkpoint, .ckpt, or HP's, .pth)")
    try:
        return peers.convert(torch_file.load(path), path, **({"dataset": dataset} if dataset is not None else {}))
    except InputError:
        raise
    except torch_file.Refused as e:
        raise InputError(f"{path}: refused: its pickle names {e.name}, which omh-ref import does not load (it "
                         "loads tensors, OrderedDict, OmegaConf configs and Lightning's bookkeeping only; "
                         "docs/DECISIONS.md)") from None
    except torch_file.Unreadable as e:
        raise InputError(f"{path}: not a readable torch checkpoint ({e})") from None
    except Exception as e:
        raise InputError(f"{path}: not a readable torch checkpoint ({torch_file.error_text(e)})") from None


def _resolutions(opts, patch) -> list:
    rs = list(opts.resolution) or [EVAL_RESOLUTION if EVAL_RESOLUTION % patch == 0 else 224]
    for r in rs:
        if r <= 0 or r % patch:
            raise InputError(f"--resolution {r}: not a positive multiple of the backbone's patch {patch}")
    return rs


def export_backbone(imp: peers.Imported, opts: ImportOptions, sha, say) -> tuple:
    """The checkpoint's backbone loaded into ``omh-ref export``'s model of its family and size,
    exported at each resolution (checked, recorded in ``DIR/manifest.json``). -> (its provenance
    as extraction will record it, the manifest entries)."""
    path = Path(opts.checkpoint)
    _needs_torch(path, f"its {FAMILY_TITLE[imp.family]} backbone ({imp.peer.backbone}*) is exported to ONNX, which")
    import torch

    from ..extract import archs, checkpoints, export_dino
    from ..extract.backbone import inspect_model

    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in imp.backbone.items()}
    where = f"{path} ({imp.peer.backbone}*)"
    try:
        spec = archs.complete(checkpoints.infer(archs.Spec(imp.family), state, where))
    except (checkpoints.CheckpointError, ValueError) as e:   # messages naming the file's keys: cleaned
        raise InputError(torch_file.clean(" ".join(str(e).split()), 1000)) from None
    for key, got in (("model_type", spec.size), ("dino_patch_size", spec.patch)):
        stated = imp.hints.get("size" if key == "model_type" else "patch")
        if stated is not None and stated != got:
            raise InputError(f"{path}: its stored {key} {torch_file.describe(stated)} does not fit its backbone's "
                             f"weights ({archs.describe(spec)}: {got!r})")
    model = export_dino.build(spec)
    try:
        checkpoints.load(model, state, where)
    except checkpoints.CheckpointError as e:
        raise InputError(torch_file.clean(" ".join(str(e).split()), 1000)) from None
    if model.dim != imp.config.in_dim:
        raise InputError(f"{path}: its backbone is {model.dim} channels wide, its head takes {imp.config.in_dim}")
    say(f"backbone: {archs.describe(spec)} from {imp.peer.backbone}* ({len(state)} tensors)")
    entries = []
    for r in _resolutions(opts, spec.patch):
        entry = export_dino.export_checked(model, r, opts.out, source=f"checkpoint:{path.name} ({imp.peer.title} "
                                                                      f"{imp.peer.backbone}*)",
                                           checkpoint_sha256=sha, say=say, err=say)
        if entry is None:
            raise InputError(f"{path}: the ONNX export of its backbone at {r} px does not match torch (above)")
        entries.append(entry)
    prov = inspect_model(Path(opts.out) / entries[0]["file"]).provenance()
    return prov, entries


def _refuse_other(out: Path, sha, overwrite, path):
    """``DIR/ckpt.npz`` of another file is not replaced without ``--overwrite``."""
    ck = out / CHECKPOINT
    if not ck.exists() or overwrite:
        return
    info = checkpoint.load(ck)["info"] if checkpoint.step_of(ck) is not None else {}
    if (info.get("imported") or {}).get("source_sha256") != sha:
        raise InputError(f"{ck}: a checkpoint is already there (not an import of {path}); choose another --out "
                         "or pass --overwrite to replace it")


def run(opts: ImportOptions, say=print) -> dict:
    """Import; -> the record written to ``DIR/import.json``."""
    path, out = Path(opts.checkpoint), Path(opts.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file (expected --out to be a folder)")
    imp = read(path, opts.dataset)
    for line in imp.notes:
        say(line)
    sha = file_sha256(path)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "import", say=say):
        _refuse_other(out, sha, opts.overwrite, path)
        cfg, p = imp.config, imp.peer
        say(f"{p.title} checkpoint {path}: head {cfg.in_dim} -> {cfg.dim} ({cfg.head_activation}), "
            f"{cfg.eval_k} clusters for {imp.n_classes} classes"
            + (", a linear probe" if imp.probe else "") + (", the teacher centres (its predictor)"
                                                            if "G" in imp.params else "")
            + (", its moving-average head" if p.teacher else ""))
        prov, entries = (None, [])
        if imp.backbone:
            prov, entries = export_backbone(imp, opts, sha, say)
        else:
            say(f"note: {path} holds no backbone ({p.backbone}*): no ONNX written, and eval/segment cannot check "
                "which backbone's features they are given")
        record = {"kind": "omh-ref import", "omh_ref_version": __version__, "peer": p.name, "peer_title": p.title,
                  "read_from": f"{p.repo}@{p.commit}", "source": str(path.resolve()), "source_sha256": sha,
                  "n_classes": imp.n_classes, "clusters": cfg.eval_k, "linear_probe": imp.probe is not None,
                  **imp.record, "hyper_parameters": imp.hyper_parameters,
                  "keys": {"used": imp.used, "backbone": len(imp.backbone or {}), "left_out": imp.ignored},
                  "exports": [{k: e[k] for k in ("name", "file", "resolution", "sha256", "weights_sha256")}
                              for e in entries]}
        arrays = {"probe_W": imp.probe["W"], "probe_b": imp.probe["b"]} if imp.probe else None
        ck_path = out / CHECKPOINT
        checkpoint.save(ck_path, imp.params, {"m": {}, "v": {}, "t": 0}, imp.step,
                        np.random.default_rng(0), cfg, arrays=arrays,
                        info={"imported": record, "backbone": prov, "n_classes": imp.n_classes})
        checkpoint.check_params(ck_path, checkpoint.load(ck_path)["params"], cfg)   # eval's own check, now
        write_text(out / RECORD, json.dumps({**record, "checkpoint": CHECKPOINT, "backbone": prov}, indent=1) + "\n")
    say(f"wrote {ck_path} ({p.name} base alone; {'eval --stored-probe scores its linear probe' if imp.probe else 'no linear probe'})")
    return record


def next_steps(out, record) -> list:
    """The commands a user runs next, as lines."""
    ck = Path(out) / CHECKPOINT
    lines = []
    for e in record["exports"]:
        lines.append(f"  omh-ref extract --model {Path(out) / e['file']} --images IMAGES --labels LABELS --out FEATS")
    probe = " --stored-probe" if record["linear_probe"] else ""
    lines.append(f"  omh-ref eval --checkpoint {ck} --features FEATS/feats.npy{probe} --upsample code   "
                 f"# scored as {record['peer_title']} scores it")
    return lines
