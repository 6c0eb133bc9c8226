"""The model's configuration: every choice of the method as a named field, its validation, config
files (TOML, JSON or YAML; STEGO's names read as omh-ref's, :mod:`.stego_names`) and the merge of
file and command-line values.

Each field is declared once, with its default, a one-line help text and its rule
(:func:`_field`). Validation, the ``omh-ref train`` flags (``--eps``, ``--rho-q`` …, built from
:func:`flag_specs`) and their help come from that declaration, so a new field is one edit here
plus the code that reads it. ``docs/METHOD.md`` says what each field means in the method.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bases, stego_names
from .errors import InputError
from .losses.cluster import TARGETS
from .losses.hierarchy import MARGINALS
from .options import flag_of
from .ops.sinkhorn import BACKWARD_MODES

# The commit that last held the variants the method study rejected (docs/ablations.md): their
# code, tests and numbers are there.
STUDY_COMMIT = "39d3f3a"


def _field(default, help, rule=None, choices=None, flag=True):
    """A config field: ``rule`` names its range check (see ``_RULES``), ``choices`` its allowed
    strings; ``flag=False`` keeps it off the command line."""
    meta = {"help": help, "rule": rule, "choices": choices, "flag": flag}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


_RULES = {
    "positive int": (lambda v: v >= 1, "a positive integer"),
    "int >= 0": (lambda v: v >= 0, "an integer >= 0"),
    "positive finite": (lambda v: v > 0 and math.isfinite(v), "a positive finite number"),
    ">= 0 finite": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
    "finite": (lambda v: math.isfinite(v), "a finite number"),
    "probability <1": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "share": (lambda v: 0 < v <= 1, "a share in (0, 1]"),
    "positive finite rho": (lambda v: v > 0 and math.isfinite(v),
                            "a positive finite number (strict balance, rho_q = inf, is cluster_target = 'balanced')"),
}


@dataclass
class Config:
    """Every choice of the method, by name (docs/METHOD.md)."""

    in_dim: int = _field(384, "C, the backbone's feature size (ViT-S 384, ViT-B 768); taken from the features",
                         "positive int", flag=False)
    dim: int = _field(70, "D, the code size", "positive int")
    levels: tuple = _field((108, 54, 27), "cluster counts of the levels, finest first, e.g. 108,54,27")
    tau: float = _field(0.1, "softmax temperature of the cluster assignments", "positive finite")
    dropout: float = _field(0.1, "channel dropout on the features in training", "probability <1")
    eps: float = _field(0.2, "hierarchy Sinkhorn ε (docs/ablations.md: 0.2 beat 0.05)", "positive finite")
    sinkhorn_iters: int = _field(50, "hierarchy Sinkhorn iterations", "positive int")
    sinkhorn_backward: str = _field("unrolled", "backward through the hierarchy's Sinkhorn",
                                    choices=BACKWARD_MODES)
    marginals: str = _field("usage", "hierarchy marginals (docs/ablations.md: usage won)", choices=MARGINALS)
    cluster_target: str = _field("relaxed", "cluster-loss targets: relaxed (OT, cluster marginal a KL penalty "
                                            "of weight rho_q), balanced (OT, strict equipartition), hard",
                                 choices=TARGETS)
    eps_q: float = _field(0.05, "ε of the target Sinkhorn (relaxed and balanced)", "positive finite")
    sinkhorn_iters_q: int = _field(20, "iterations of the target Sinkhorn", "positive int")
    rho_q: float = _field(0.1, "cluster-marginal KL weight of the relaxed targets (docs/ablations.md: 0.1 beat "
                               "strict balance); cluster_target balanced is the limit rho_q -> inf",
                          "positive finite rho")
    lam_clu: float = _field(1.0, "weight λ_clu of the cluster losses", ">= 0 finite")
    lam_hier: float = _field(1.0, "weight λ_hier of the hierarchy losses (0: no hierarchy)", ">= 0 finite")
    lam_w: float = _field(0.1, "weight λ_W of the Wasserstein term <T, C> in each hierarchy loss", ">= 0 finite")
    feature_samples: int = _field(11, "S: S x S sampled points per image for the correlation loss", "positive int")
    neg_samples: int = _field(5, "random negative pairings per step", "int >= 0")
    weight_neg: float = _field(0.63, "correlation weight of negative pairs", ">= 0 finite")
    weight_inter: float = _field(0.25, "correlation weight of KNN pairs", ">= 0 finite")
    weight_intra: float = _field(0.67, "correlation weight of self pairs", ">= 0 finite")
    shift_neg: float = _field(0.66, "correlation shift of negative pairs", "finite")
    shift_inter: float = _field(0.02, "correlation shift of KNN pairs", "finite")
    shift_intra: float = _field(0.08, "correlation shift of self pairs", "finite")
    pointwise: bool = _field(True, "centre the feature correlations per row (STEGO's pointwise)")
    zero_clamp: bool = _field(True, "clamp code correlations at 0 (STEGO's zero_clamp)")
    base: str = _field("stego", "the base method whose loss trains the projection head (core/bases); a base "
                                "sets its own defaults for the fields not given (smooseg: dim 64, dropout 0.2, "
                                "silu head, its shifts and weights; hp: dim 512, ema_alpha 0.99, its SupCon "
                                "values)", choices=tuple(bases.BASES))
    head_activation: str = _field("relu", "activation inside the projection head's second branch (STEGO relu, "
                                          "SmooSeg silu)", choices=("relu", "silu"))
    teacher_tau: float = _field(0.1, "softmax temperature of the teacher probabilities SmooSeg's smoothness loss "
                                     "compares", "positive finite")
    ema_alpha: float = _field(0.998, "the base's teacher, a moving average: SmooSeg's centres G <- alpha G + "
                                     "(1 - alpha) M, HP's head E <- alpha E + (1 - alpha) head, each step",
                              "probability <1")
    supcon_tau: float = _field(0.8, "HP's SupCon temperature (COCO-Stuff 0.8, Cityscapes 0.6, Potsdam 0.4)",
                               "positive finite")
    consistency_weight: float = _field(0.05, "HP's weight of the distance between the projected codes of the "
                                             "features and of their augmented copy (0: feats_aug.npy not read)",
                                       ">= 0 finite")
    denominator_share: float = _field(0.02, "HP's share of the batch's pixels drawn into each SupCon denominator "
                                            "besides the anchor's positives (1: every pixel)", "share")
    pool_size: int = _field(2048, "HP's reference pools: patches, one from each of this many random crops",
                            "positive int")
    renew_interval: int = _field(100, "HP's task-specific pool is refilled every this many steps",
                                 "positive int")
    warmup: int = _field(1000, "HP's task-specific positives weigh 0 through this step, then rise "
                               "linearly with the step", "int >= 0")
    omh: bool = _field(True, "OMH on top of the base: every level's cluster head trained jointly with the code, "
                             "and the hierarchy between them; --no-omh: the base alone (one cluster probe of the "
                             "eval level's size on a detached code, trained the base's way)")
    eval_level: int = _field(-1, "index into levels of the level whose clusters are the predictions")
    extra: dict = _field({}, "free-form notes carried into checkpoints", flag=False)

    def __post_init__(self):
        self.validate()
        self.levels = tuple(int(k) for k in self.levels)
        if not self.omh:
            self._resolve_base_alone()

    def _resolve_base_alone(self):
        """``omh = false`` is resolved here, once, where the config is built or loaded: the base's
        own recipe, one cluster probe of the eval level's size trained the base's way
        (``PROBE_TARGET``) on a detached code, no hierarchy. Resolving twice changes nothing."""
        base = bases.get(self.base)
        self.levels = (self.levels[self.eval_level],)
        self.eval_level = -1
        self.cluster_target = base.PROBE_TARGET
        self.tau = getattr(base, "PROBE_TAU", None) or self.tau
        self.lam_hier = 0.0

    def _check_types(self):
        """Each field has its default's type (an int is a float too; bools are not numbers), so
        a config file's ``"levels": 6`` or ``"lr": "x"`` is named, not a TypeError later."""
        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for f in dataclasses.fields(self):
            v, d = getattr(self, f.name), f.default if f.default is not dataclasses.MISSING else None
            if isinstance(d, bool):
                ok, want = isinstance(v, bool), "true or false"
            elif isinstance(d, int):
                ok, want = is_int(v), "an integer"
            elif isinstance(d, float):
                ok, want = (is_int(v) or isinstance(v, (float, np.floating))), "a number"
            elif isinstance(d, str):
                ok, want = isinstance(v, str), "a string"
            elif isinstance(d, tuple):
                ok, want = isinstance(v, (tuple, list)) and all(is_int(k) for k in v), "a list of integers"
            else:
                ok, want = isinstance(v, dict), "a table"
            if not ok:
                raise ValueError(f"config field {f.name!r}: expected {want}, got {v!r}")

    def validate(self):
        """Raise a ValueError naming the first bad field: its type (:meth:`_check_types`), then
        its range (the field's rule or choices)."""
        def bad(name, expected):
            return ValueError(f"config field {name!r}: expected {expected}, got {getattr(self, name)!r}")

        self._check_types()
        for f in dataclasses.fields(self):
            v, rule, choices = getattr(self, f.name), f.metadata["rule"], f.metadata["choices"]
            if rule is not None and not _RULES[rule][0](v):
                raise bad(f.name, _RULES[rule][1])
            if choices is not None and v not in choices:
                raise bad(f.name, f"one of {choices}")
        if len(self.levels) < 1 or any(k < 1 for k in self.levels):
            raise bad("levels", "one or more cluster counts, each >= 1")
        if any(a <= b for a, b in zip(self.levels, self.levels[1:])):
            raise bad("levels", "strictly decreasing sizes, finest first (e.g. 108,54,27)")
        if not -len(self.levels) <= self.eval_level < len(self.levels):
            raise bad("eval_level", f"an index into levels {self.levels}")
        if self.cluster_target == "teacher" and (self.omh or not bases.teacher_centres(bases.get(self.base))):
            raise bad("cluster_target", "relaxed, balanced or hard ('teacher' is SmooSeg's student, its base alone: "
                                        "--base smooseg --no-omh)")

    @property
    def detach_clusters(self) -> bool:
        """The base alone trains its probe on a detached code (the probe gives the code no gradient)."""
        return not self.omh

    @property
    def eval_index(self) -> int:
        """The eval level as an index in 0 .. len(levels) - 1."""
        return self.eval_level % len(self.levels)

    @property
    def eval_k(self) -> int:
        """Clusters of the level whose argmax is the prediction."""
        return self.levels[self.eval_level]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The config of a dict of fields, old names migrated (:func:`upgrade`)."""
        d = upgrade(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(unknown)}{stego_names.hint(unknown)}")
        return cls(**d)


def with_base_defaults(fields: dict) -> dict:
    """``fields`` over the defaults of the base they name (``base``, STEGO's when absent): a base
    module's ``DEFAULTS`` are its own values of the fields where they differ from omh-ref's
    (SmooSeg's dim, dropout, activation, shifts ...). For a new config only: a checkpoint's config
    already holds every value. An unknown base adds nothing: the config's validation names it
    (with the file it came from)."""
    base = bases.BASES.get(fields.get("base") or "stego")
    return {**(base.DEFAULTS if base is not None else {}), **fields}


# Fields of older configs (checkpoints, config files): the value each took when it meant "as now",
# and the retired choices of fields that stay.
RETIRED = {"hier_form": "kl", "lam_sparse": 0.0, "predict_through_plan": False}
RETIRED_TARGETS = ("soft",)


def upgrade(d: dict) -> dict:
    """An older config's fields as today's: ``baseline = "stego"`` is ``omh = false`` on the STEGO
    base (``"omh"``: ``omh = true``); a retired field at the value that meant today's method is
    dropped. A retired field at another value, or a retired cluster target, names the commit that
    still has that variant instead of training another model in its name."""
    d = dict(d)
    if "baseline" in d:
        old = d.pop("baseline")
        if old not in ("omh", "stego"):
            raise ValueError(f"config field 'baseline': expected 'omh' or 'stego' (now base and omh), got {old!r}")
        d.setdefault("omh", old == "omh")
        d.setdefault("base", "stego")
    for name, meant_now in RETIRED.items():
        if name in d:
            v = d.pop(name)
            if v != meant_now:
                raise ValueError(f"config field {name!r} = {v!r}: a variant the method study rejected, retired "
                                 f"(docs/ablations.md); commit {STUDY_COMMIT} still has it")
    if d.get("cluster_target") in RETIRED_TARGETS:
        raise ValueError(f"config field 'cluster_target' = {d['cluster_target']!r}: a variant the method study "
                         f"rejected, retired (docs/ablations.md); commit {STUDY_COMMIT} still has it")
    return d


# --------------------------------------------------------------------------------------------------
# Command-line flags, config files and merging
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlagSpec:
    """One command-line flag of a config field: ``--name-with-dashes``."""
    name: str           # the field
    flag: str
    kind: type          # bool, int, float, str, tuple
    help: str
    choices: tuple | None
    default: object = None   # the field's default, what the flag's help shows

    @property
    def shown_default(self) -> str:
        """The default as a command line spells it: '108,54,27', 'omh' / 'no-omh' (click's way for
        a flag pair), '0.2'."""
        if isinstance(self.default, bool):
            return self.flag[2:] if self.default else "no-" + self.flag[2:]
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default))
        return str(self.default)


def flag_specs() -> list:
    """The flags of every config field that has one, in declaration order."""
    out = []
    for f in dataclasses.fields(Config):
        if f.metadata["flag"]:
            out.append(FlagSpec(f.name, flag_of(f.name), type(f.default), f.metadata["help"],
                                f.metadata["choices"], f.default))
    return out


def parse_levels(text, source="--levels") -> tuple:
    """'108,54,27' -> (108, 54, 27); anything else is an InputError naming ``source``."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise InputError(f"{source}: expected comma-separated integers like 108,54,27, got {text!r}") from None


def parse_shifts(text) -> tuple:
    """``--shifts``: 'auto' -> ({}, True); 'neg,inter,intra' -> ({shift_neg: ...}, False)."""
    if text is None:
        return {}, False
    if text == "auto":
        return {}, True
    try:
        neg, inter, intra = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--shifts: expected 'auto' or three numbers neg,inter,intra, got {text!r}") from None
    return {"shift_neg": neg, "shift_inter": inter, "shift_intra": intra}, False


TABLES = ("model", "train", "recipe")
FORMATS = {".toml": "TOML", ".json": "JSON", ".yml": "YAML", ".yaml": "YAML"}


def _yaml(text):
    """YAML as OmegaConf (STEGO's hydra) reads it: ``5e-4`` is a number, not YAML 1.1's string."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def _parse(p: Path):
    """The file's data by its suffix (TOML, YAML; anything else is read as JSON); one-line errors."""
    kind = FORMATS.get(p.suffix, "JSON")
    try:
        if kind == "TOML":
            import tomllib

            return tomllib.loads(p.read_text())
        return _yaml(p.read_text()) if kind == "YAML" else json.loads(p.read_text())
    except ImportError:
        need = "PyYAML: pip install 'omh-ref[yaml]'" if kind == "YAML" else "Python >= 3.11; use JSON"
        raise InputError(f"{p}: {kind} configs need {need}") from None
    except Exception as e:
        raise InputError(f"{p}: not valid {kind} ({' '.join(str(e).split())})") from None


def _say_stderr(line):
    print(line, file=sys.stderr)


def read_file(path, say=None) -> dict:
    """A TOML, JSON or YAML config file as its tables: ``{"model": {...}, "train": {...}}`` (either
    may be empty). Model fields may also stand at the top level of a file without tables, and so
    may STEGO's keys, its ``train_config.yml`` as it is (:mod:`omh_ref.core.stego_names`: its loop
    keys go to "train"; a STEGO name is read as omh-ref's with a note line through ``say``,
    stderr by default). A ``[recipe]`` table (the settings of ``omh-ref recipe`` that are not the
    model's or the loop's: crops, resolutions, backbone; see ``configs/``) is returned under
    ``"recipe"`` when the file has one; ``omh-ref train`` ignores it, so a recipe is also a
    training config."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file (expected a TOML, JSON or YAML config)")
    data = _parse(p)
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a table of config fields at the top level, got {type(data).__name__}")
    out, notes = _tables(p, data)
    for line in notes:
        (say or _say_stderr)(line)
    return out


def _tables(p, data):
    """(the file's tables in omh-ref's terms, note lines) of its parsed ``data``."""
    if not set(TABLES) & set(data):
        return stego_names.translate(data, p)
    extra = sorted(set(data) - set(TABLES))
    if extra:
        raise InputError(f"{p}: with [model]/[train]/[recipe] tables, top-level keys are not read; move "
                         f"{', '.join(map(repr, extra))} into one of them")
    for name in TABLES:
        if not isinstance(data.get(name, {}), dict):
            raise InputError(f"{p}: [{name}] must be a table of fields, got {type(data[name]).__name__}")
    out, notes = {"model": {}, "train": {}}, []
    for name in ("model", "train"):
        got, said = stego_names.translate(data.get(name, {}), p, table=name, root=data)
        out[name], notes = got[name], notes + said
    if "recipe" in data:
        out["recipe"] = data["recipe"]
    return out, notes


def _refuse_old_balanced(layer, source):
    """Before the target names said what they do, ``balanced`` with a finite ``rho_q`` meant the
    relaxed targets; now ``balanced`` is strict and takes no ``rho_q``. A file or flags that give
    both are refused with a hint instead of silently training another model."""
    rho = layer.get("rho_q")
    if layer.get("cluster_target") == "balanced" and rho is not None and math.isfinite(rho):
        raise InputError(f"{source or 'config'}: cluster_target 'balanced' is strict equipartition and takes no "
                         f"rho_q (got {rho}); for targets relaxed by rho_q use cluster_target 'relaxed' "
                         "(what 'balanced' with a finite rho_q meant before)")


def merge(base, *layers, source=None) -> Config:
    """``base`` (a Config or a dict of fields) with each layer of overrides applied in turn (later
    layers win; None values are skipped; ``levels`` may be a '108,54,27' string). A bad field is an
    InputError naming the field (and ``source``, a file, when given)."""
    try:
        fields = upgrade(dataclasses.asdict(base) if isinstance(base, Config) else dict(base))
        layers = [upgrade({k: v for k, v in layer.items() if v is not None}) for layer in layers]
    except ValueError as e:
        raise InputError(f"{source}: {e}" if source else str(e)) from None
    for layer in layers:
        _refuse_old_balanced(layer, source)
        for name, value in layer.items():
            if value is not None:
                fields[name] = parse_levels(value) if name == "levels" and isinstance(value, str) else value
    try:
        return Config.from_dict(fields)
    except ValueError as e:
        raise InputError(f"{source}: {e}" if source else str(e)) from None
