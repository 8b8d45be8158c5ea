"""AdapterConfig: the knobs of every method, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.methods import METHODS


def _choices(names) -> str:
    return ", ".join(names)


@dataclass(frozen=True)
class AdapterConfig:
    """Which method to apply and how.

    method: one of `adapters.METHODS`.
    rank: r, the adapter rank (columns selected, for the selector methods).
    alpha: scale numerator, s = alpha / rank; None means 2 * rank (the paper's default, s = 2).
    targets: module names to adapt; None means the attention query and value projections of the
        architecture. A list/tuple matches a module whose name equals an entry or ends with "." + entry;
        a single string is a regular expression matched against the whole module name (as in PEFT).
    chain_segments: k, the number of training segments of the chained methods (cola, rac, c3la, r_c3la).
    lora_plus_ratio: lr(B) / lr(A) for lora_plus.
    seed: run seed; random factors and selectors are drawn from hash(seed, module name, segment).
    head: names of the task-head modules, trained by every method (top-level children of the model).
    """

    method: str
    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] | str | None = None
    chain_segments: int = 3
    lora_plus_ratio: float = 16.0
    seed: int = 0
    head: tuple[str, ...] = field(default=("classifier", "score"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"AdapterConfig.method: unknown method {self.method!r}; "
                             f"valid methods: {_choices(METHODS)}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterConfig.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        if not float(self.alpha) > 0:
            raise ValueError(f"AdapterConfig.alpha must be > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError("AdapterConfig.targets must be None, a regex string or a non-empty "
                                 f"list of module names, got {self.targets!r}")
            object.__setattr__(self, "targets", tuple(self.targets))
        elif self.targets is not None and not (isinstance(self.targets, str) and self.targets):
            raise ValueError("AdapterConfig.targets must be None, a regex string or a list of module "
                             f"names, got {self.targets!r}")
        if isinstance(self.chain_segments, bool) or not isinstance(self.chain_segments, int) \
                or self.chain_segments < 1:
            raise ValueError(f"AdapterConfig.chain_segments must be an integer >= 1, got {self.chain_segments!r}")
        if not float(self.lora_plus_ratio) > 0:
            raise ValueError(f"AdapterConfig.lora_plus_ratio must be > 0, got {self.lora_plus_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"AdapterConfig.seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "head", tuple(self.head))

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    @property
    def spec(self):
        return METHODS[self.method]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        d["head"] = list(self.head)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
