"""The options more than one command takes, declared once: name, default, help and how a value
is spelled on a command line. The model's own options are :mod:`omh_ref.core.config`'s fields.

Families: :data:`LOOP` (the training loop: ``omh-ref train``; ``seeds``, ``demo`` and ``recipe``
take the part they vary), :data:`DEVICE`, :data:`OUTPUT` (progress), :data:`CRF` (the dense CRF of
``eval``, ``segment``, ``seeds``, ``recipe``), :data:`DASK` and :data:`PROVENANCE` (mixing backbones). The command line generates its
flags from these (``cli/main.py``), the options dataclasses take their defaults from them
(:func:`default`), and a job that prints the command doing its work (``recipe --dry-run``)
spells each value with :func:`argv` (:func:`command`). Any other parameter is spelled by
:func:`flag_of`, which the command line uses for the flags a job prints, so no flag name is
written twice.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    name: str                  # the Python name (an options dataclass's field)
    default: object
    help: str
    kind: type = str           # int, float, str, bool (bool: an on/off flag)
    choices: tuple | None = None
    negatable: bool = False    # a bool spelled --x / --no-x (else --x alone turns it on)
    minimum: int | None = None  # an int refused below this by the command line itself

    @property
    def flag(self) -> str:
        return _spelled(self.name)


def _family(*opts) -> dict:
    return {o.name: o for o in opts}


LOOP = _family(
    Option("steps", 300, "Training steps.", int),
    Option("batch_size", 8, "Images per training step.", int),
    Option("lr", 5e-4, "Learning rate of the projection head.", float),
    Option("lr_clusters", 5e-3, "Learning rate of the centroids.", float),
    Option("seed", 0, "Training seed (data order, KNN partners, every model draw).", int),
    Option("ckpt_every", 100, "Steps between checkpoints (and after the last).", int),
    Option("log_every", 10, "Steps between log lines.", int),
    Option("val_every", 100, "Steps between validations (and after the last).", int),
    Option("knn_k", 7, "KNN partners drawn from ranks 1..k.", int),
    Option("weight_decay", None, "AdamW's decoupled weight decay of the head's parameters, biases included (0: off) "
                                 "[default: the base's: hp 0.1, else off; a resumed run's own].", float),
    Option("grad_clip", None, "Clip the head's gradients to this global L2 norm (0: off) [default: the base's: hp 10, "
                              "else off; a resumed run's own].", float),
)
DEVICE = _family(Option("device", "cpu", "Arrays on the CPU (NumPy) or the GPU (CuPy).", str, ("cpu", "gpu")))
OUTPUT = _family(Option("quiet", False, "No progress bars.", bool))
CRF = _family(
    Option("crf", False, "Refine the cluster predictions with a dense CRF (omh-ref[crf]).", bool),
    Option("crf_workers", 1, "Processes for the CRF (1 = serial).", int, minimum=1),
    Option("crf_timeout", 600.0, "Seconds a CRF batch may take before it is stopped.", float),
)
DASK = _family(Option("scheduler", None, "Run on Dask: local:N (N worker processes) or a scheduler address."))
PROBE = _family(Option("probe", True, "The linear probe on the training features and their labels.", bool,
                       negatable=True),
                Option("stored_probe", False, "Score the linear probe stored in the checkpoint (a peer's released "
                                              "probe, kept by omh-ref import), untrained, with the identity mapping; "
                                              "no --train-features.", bool))

PROVENANCE = _family(Option("allow_backbone_mismatch", False,
                            "Go on (with a warning) when features or the --model come from another backbone than "
                            "the checkpoint's training features (refused otherwise).", bool))

_ALL = {**LOOP, **DEVICE, **OUTPUT, **CRF, **DASK, **PROBE, **PROVENANCE}


def get(name) -> Option:
    return _ALL[name]


def default(name):
    """The one default of option ``name``."""
    return _ALL[name].default


# How a parameter is spelled on the command line: ``--name-with-dashes``, except these (the
# command line and every job that prints a command take the spelling from :func:`flag_of`).
SPELLINGS = {"seed_list": "--seeds", "config_file": "--config", "json_out": "--json"}


def _spelled(name) -> str:
    return SPELLINGS.get(name, "--" + name.replace("_", "-"))


def flag_of(name) -> str:
    """The command-line flag of parameter ``name``: ``--name-with-dashes``, or its
    :data:`SPELLINGS` entry (a declared option, a config field or a command's own)."""
    return _spelled(name)


def command(name, **values) -> list:
    """``omh-ref <name>`` with each value spelled by :func:`argv`, in the order given."""
    words = ["omh-ref", name]
    for key, value in values.items():
        words += argv(key, value)
    return words


def argv_if_changed(name, value) -> list:
    """:func:`argv`, or [] when ``value`` is the option's default (a command line then need not
    say it)."""
    return [] if value == _ALL[name].default else argv(name, value)


def argv(name, value, negatable=None) -> list:
    """``value`` of option ``name`` as command-line words: [] for an off flag or None,
    ['--crf'] for an on one, ['--no-probe'] for a negatable one turned off (``negatable``: the
    declared option's, else False; a config field's flags are all negatable)."""
    o = _ALL.get(name)
    flag = flag_of(name)
    if negatable is None:
        negatable = o is not None and o.negatable
    if isinstance(value, bool) or (o is not None and o.kind is bool):
        if value:
            return [flag]
        return ["--no-" + flag[2:]] if negatable else []
    if value is None:
        return []
    return [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
