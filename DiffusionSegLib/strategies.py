"""Fine-tuning strategies: what each starts from and which parts of the segmentor it trains. One table.

Standard library only, like ``organs.py``: the Slicer module and ``bridge/`` read it before torch is
installed, the command line takes its choices and help from it, the segmentor its freezing, the
label-efficiency benchmark its heads and row names.

A segmentor is three parts in forward order (``PARTS``): the encoder (time-embedding MLP, input blocks,
middle block), the decoder (output blocks) and the head. A strategy trains a tail of that order, so
what it freezes is a head start of the forward pass, computed without autograd (and cacheable, see
``finetune.FrozenCache``) before the trainable rest.

Adding a strategy: add a row here. `trains` must be a tail of `PARTS`; `offered` puts it in
``diffusionseg finetune --strategy`` and the Slicer module's menu; a row that trains the same parts from
the same start as an offered one (like lp-mlp) runs through the fine-tuning loop as that one.
"""

from __future__ import annotations

from dataclasses import dataclass

PARTS = ("encoder", "decoder", "head")

# The 2-layer conv head every offered strategy builds (`SegmentationHead`'s default).
DEFAULT_HEAD_LAYERS = 2


@dataclass(frozen=True)
class Strategy:
    name: str  # as given to --strategy and recorded in model cards
    label: str  # short display name: "FT-dec"
    summary: str  # what it trains, in a few words: menus, --help, tooltips ("FT-dec: encoder frozen")
    title: str  # row name in the label-efficiency report
    description: str  # one sentence for the label-efficiency report
    pretrained: bool  # starts from a pretrained backbone; False: random weights (only the architecture is kept)
    trains: tuple[str, ...]  # the parts that learn, a tail of PARTS; the others stay as they start
    head_layers: int  # hidden conv layers of its head in the label-efficiency benchmark; 0: a linear classifier (one 1x1 conv)
    offered: bool = True  # in `diffusionseg finetune` and the Slicer module; False: a benchmark variant only

    def __post_init__(self) -> None:
        if not self.trains or self.trains != PARTS[len(PARTS) - len(self.trains):]:
            raise ValueError(f"strategy {self.name}: trains {self.trains}, not a tail of {PARTS}")

    @property
    def frozen(self) -> tuple[str, ...]:
        """The parts that do not learn: the start of the forward pass."""
        return PARTS[: len(PARTS) - len(self.trains)]

    @property
    def menu_label(self) -> str:
        return f"{self.label}: {self.summary}"

    @property
    def finetune_as(self) -> str:
        """The offered strategy the fine-tuning loop runs this one as: the one that trains the same parts from the same start."""
        if self.offered:
            return self.name
        return next(s.name for s in TABLE if s.offered and s.trains == self.trains and s.pretrained == self.pretrained)


TABLE = (
    Strategy("ft-dec", "FT-dec", "encoder frozen", "FT-dec", "encoder frozen, decoder and 2-layer head trained",
             pretrained=True, trains=("decoder", "head"), head_layers=2),
    Strategy("lp", "LP", "head only", "LP (linear)",
             "the method's linear probe: one 1x1 conv on the frozen decoder features, biases started at the training labels' log class frequencies",
             pretrained=True, trains=("head",), head_layers=0),
    Strategy("lp-mlp", "LP-MLP", "2-layer head only", "LP-MLP (2-layer head)", "the 2-layer conv head on the frozen decoder features",
             pretrained=True, trains=("head",), head_layers=2, offered=False),
    Strategy("fs", "FS", "from scratch", "FS (from scratch)",
             "the same architecture, head and preprocessing from random initialisation, everything trained",
             pretrained=False, trains=PARTS, head_layers=2),
)

ALL_STRATEGIES = tuple(s.name for s in TABLE)  # table order: the order of report rows
STRATEGIES = tuple(s.name for s in TABLE if s.offered)  # what --strategy and the Slicer module offer
DEFAULT_STRATEGY = "ft-dec"


def get(name: str) -> Strategy:
    """The table's row for `name`; ValueError for a name not in the table."""
    for row in TABLE:
        if row.name == name:
            return row
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(ALL_STRATEGIES)}")


def summaries(names: tuple[str, ...] = STRATEGIES) -> str:
    """'ft-dec: encoder frozen; lp: head only; fs: from scratch', for --help."""
    return "; ".join(f"{name}: {get(name).summary}" for name in names)


def tooltip(names: tuple[str, ...] = STRATEGIES) -> str:
    """'FT-dec: encoder frozen (default); LP: head only; FS: from scratch', for a menu's tooltip."""
    return "; ".join(get(n).menu_label + (" (default)" if n == DEFAULT_STRATEGY else "") for n in names)
