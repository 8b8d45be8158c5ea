"""The eleven adaptation methods: one registry that the API, CLI, specs and error messages read.

A method is a row of data, not a class: which layer kind it uses, what that layer trains, how its
fixed factor (A) is chosen and whether training is chained into segments. The maths lives in the
layers (`adapters.layers`); see docs/specs/adaptation-methods.md for the contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LayerKind = Literal["full", "low_rank", "selector"]
# How A (or the selected columns) is drawn; see adapters.selectors.
Selector = Literal["kaiming", "first", "random", "window", "random_window"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    layer: LayerKind
    summary: str
    selector: Selector | None = None
    train_a: bool = False      # low_rank only: A is trained too (lora, lora_plus, cola)
    chained: bool = False      # training is split into segments merged at each boundary
    lora_plus: bool = False    # lr(B) = lora_plus_ratio * lr(A)
    columns: bool = False      # selector only: train W's columns directly (PaCA) instead of B


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("full", "full", "every weight trained"),
    MethodSpec("lora", "low_rank", "W0 + s B A, A and B trained", "kaiming", train_a=True),
    MethodSpec("lora_plus", "low_rank", "LoRA with lr(B) = ratio * lr(A)", "kaiming", train_a=True,
               lora_plus=True),
    MethodSpec("cola", "low_rank", "chained LoRA: A_j, B_j per segment, merged at boundaries", "kaiming",
               train_a=True, chained=True),
    MethodSpec("asym", "low_rank", "asymmetric LoRA: random A frozen, B trained", "kaiming"),
    MethodSpec("rac", "low_rank", "chained asym: a new frozen random A_j per segment", "kaiming",
               chained=True),
    MethodSpec("paca", "selector", "r random columns of W trained directly", "random", columns=True),
    MethodSpec("cla", "selector", "cheap LoRA: A = [I_r, 0] (first r input columns), B trained", "first"),
    MethodSpec("r_cla", "selector", "randomized cLA: A selects r random input columns", "random"),
    MethodSpec("c3la", "selector", "chained circulant cLA: the r-wide window moves by r each segment",
               "window", chained=True),
    MethodSpec("r_c3la", "selector", "randomized c3LA: r-aligned windows in a seeded random order",
               "random_window", chained=True),
)}
