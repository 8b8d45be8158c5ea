"""Many adapters over one frozen base model, each token of a batch with its own (as Punica, S-LoRA and vLLM's
multi-LoRA serve LoRAs). Inference only.

Every adapter is a low-rank update (adapters.lowrank), so a bank keeps, per adapted module, its adapters'
factors stacked by slot: B (slots, n, R) with the scale folded in, and A (slots, R, m) for the LoRA family or
the selected columns idx (slots, R) for the selector family (cla, r_cla, c3la, r_c3la, paca). Ranks are
padded to the module's largest with zero columns of B. A module's forward adds, to the base output,
- for a run of tokens of one adapter (a prompt chunk): (x A^T) B^T, or x[:, idx] B^T, on that slice;
- for single tokens of many adapters (a decode step): per family, H (tokens, slots x R) holding each token's
  A x (LoRA family: one GEMM against every slot's A, then a one-hot mask keeps each token's own slot; selector
  family: each token's gathered columns put in its slot's block), then one GEMM H Bt against every slot's
  B. A step costs the same few ops however many adapters it mixes; on a CPU, two small GEMMs beat
  gathering each token's factors (index_select copies) and batched matmuls (BGMV) several times over.
Tokens of the base model get nothing added. The bank never changes the base weights.

    bank = AdapterBank(model, slots=8)
    bank.put(0, lowrank.read_factors(path_a, model)[1])
    with bank.route(Routing.packed([(0, 0, 1), (None, 1, 1), (0, 2, 5)], bank, device)):
        model(input_ids=ids)   # ids: (1, 7): token 0 and tokens 2..6 adapted by slot 0, token 1 plain
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.lowrank import LowRank


class BankedModule(nn.Module):
    """A base layer (nn.Linear or GPT-2's Conv1D) plus the bank's per-slot factors for it."""

    def __init__(self, base: nn.Module, bank: AdapterBank, n: int, m: int):
        super().__init__()
        self.base_layer = base
        self.bank = bank   # not a submodule: a plain reference (the bank holds the model)
        w, dt, slots = base.weight, bank.compute_dtype(base.weight), bank.slots
        # B^T per slot, (slots, R, n): a row's delta is one (1, R) x (R, n) product, batched over rows
        self.register_buffer("Bt", torch.zeros(slots, 0, n, dtype=dt, device=w.device), persistent=False)
        self.register_buffer("A", torch.zeros(slots, 0, m, dtype=dt, device=w.device), persistent=False)
        self.register_buffer("idx", torch.zeros(slots, 0, dtype=torch.long, device=w.device), persistent=False)

    def _grow(self, rank: int) -> None:
        pad = rank - self.Bt.shape[1]
        if pad > 0:
            s, _, n = self.Bt.shape
            self.Bt = torch.cat([self.Bt, self.Bt.new_zeros(s, pad, n)], dim=1)
            self.A = torch.cat([self.A, self.A.new_zeros(s, pad, self.A.shape[2])], dim=1)
            self.idx = torch.cat([self.idx, self.idx.new_zeros(s, pad)], dim=1)

    @torch.no_grad()
    def put(self, slot: int, f: LowRank | None) -> None:
        self.Bt[slot].zero_()
        self.A[slot].zero_()
        self.idx[slot].zero_()
        if f is None:
            return
        self._grow(f.rank)
        r = f.rank
        self.Bt[slot, :r] = (f.B.float() * f.scale).T.to(self.Bt.dtype)
        if f.selects:
            self.idx[slot, :r] = f.idx
        else:
            self.A[slot, :r] = f.A.to(self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routing = self.bank.routing
        if routing is None or routing.empty:
            return y
        x2, y2 = x.reshape(-1, x.shape[-1]).to(self.Bt.dtype), y.view(-1, y.shape[-1])
        for slot, start, end in routing.runs:
            xs = x2[start:end]
            h = xs.index_select(1, self.idx[slot]) if self.bank.selects[slot] else xs @ self.A[slot].T
            y2[start:end] += (h @ self.Bt[slot]).to(y2.dtype)
        for single in routing.singles:
            xs = x2 if single.rows is None else x2.index_select(0, single.rows)
            slots, rank = self.A.shape[0], self.A.shape[1]
            if single.selects:   # each row's selected columns, placed in its slot's block of H
                h = torch.zeros(len(xs), slots, rank, dtype=xs.dtype, device=xs.device)
                h[single.order, single.slots] = xs.gather(1, self.idx.index_select(0, single.slots))
            else:   # every slot's A on every row in one GEMM, then only each row's own slot kept
                h = (xs @ self.A.view(-1, self.A.shape[2]).T).view(len(xs), slots, rank)
                h.mul_(single.mask.to(h.dtype))
            d = h.view(len(xs), -1) @ self.Bt.view(-1, self.Bt.shape[2])   # (t, slots R) x (slots R, n)
            if single.rows is None:
                y2 += d.to(y2.dtype)
            else:
                y2.index_add_(0, single.rows, d.to(y2.dtype))
        return y


@dataclass(frozen=True)
class Singles:
    """Single tokens of one family (decode rows): their rows (None: every token, in order), each row's slot,
    0..t-1, and the (t, slots, 1) one-hot of each row's slot."""

    rows: torch.Tensor | None
    slots: torch.Tensor
    selects: bool
    order: torch.Tensor
    mask: torch.Tensor


@dataclass
class Routing:
    """Which adapter slot each token of a forward uses, over the batch's tokens flattened in order.

    runs: (slot, start, end) slices of one adapter; singles: (rows or None for every token, slots, selector
    family?) tokens whose factors are gathered per row. Build with `uniform` or `packed`."""

    runs: list[tuple[int, int, int]] = field(default_factory=list)
    singles: list[Singles] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.runs and not self.singles

    @classmethod
    def uniform(cls, slot: int | None) -> Routing:
        """Every token of the forward on one slot (None: the base model), whatever the batch's shape."""
        return cls([(slot, 0, None)] if slot is not None else [])

    @classmethod
    def packed(cls, spans: list[tuple[int | None, int, int]], bank: AdapterBank, device) -> Routing:
        """`spans`: (slot or None, start, length) covering the tokens in order. Spans of several tokens run as
        slices; single tokens (decode rows) are gathered per family."""
        slots = {s for s, _, _ in spans if s is not None}
        if len(slots) == 1 and all(s is not None for s, _, _ in spans):
            return cls.uniform(slots.pop())
        runs, single = [], {True: ([], []), False: ([], [])}
        for slot, start, length in spans:
            if slot is None:
                continue
            if length == 1:
                rows, ss = single[bank.selects[slot]]
                rows.append(start)
                ss.append(slot)
            else:
                runs.append((slot, start, start + length))
        total = sum(length for _, _, length in spans)
        singles = []
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        for selects, (rows, ss) in single.items():
            if rows:
                slots = as_tensor(ss)
                mask = torch.nn.functional.one_hot(slots, bank.slots).to(torch.float32).unsqueeze(-1)
                singles.append(Singles(None if rows == list(range(total)) else as_tensor(rows), slots, selects,
                                       torch.arange(len(ss), device=device), mask))
        return cls(runs, singles)


class AdapterBank:
    """`slots` adapters over `model`, applied per token. `put(slot, factors)` installs one (wrapping the
    modules it adapts on first use), `clear(slot)` removes it; `route(routing)` says, for the forwards run
    inside it, which token uses which slot."""

    def __init__(self, model: nn.Module, slots: int):
        if slots < 1:
            raise ValueError(f"an adapter bank needs at least one slot, got {slots}")
        self.model, self.slots = model, slots
        self.modules: dict[str, BankedModule] = {}
        self.selects = [False] * slots
        self.routing: Routing | None = None

    @staticmethod
    def compute_dtype(weight: torch.Tensor) -> torch.dtype:
        """The factors' dtype: float32 on CPU, where small bf16 GEMMs run ~3x slower than float32 ones
        (measured on an AVX-512 BF16 EPYC: 28 vs 8.5 us for (8, 576) x (576, 16)); the model's elsewhere."""
        return torch.float32 if weight.device.type == "cpu" else weight.dtype

    def _wrap(self, name: str, f: LowRank) -> BankedModule:
        if name not in self.modules:
            try:
                base = self.model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the adapter adapts {name!r}, which this {type(self.model).__name__} "
                                 "does not have: another base model?") from None
            n = f.B.shape[0]
            want = (n, f.in_features) if isinstance(base, nn.Linear) else (f.in_features, n)   # Conv1D: (m, n)
            if tuple(base.weight.shape) != want:
                raise ValueError(f"the adapter's {name!r} is {n}x{f.in_features} but the model's weight is "
                                 f"{tuple(base.weight.shape)}: another base model?")
            parent, _, child = name.rpartition(".")
            wrapped = BankedModule(base, self, n, f.in_features)
            setattr(self.model.get_submodule(parent) if parent else self.model, child, wrapped)
            self.modules[name] = wrapped
        return self.modules[name]

    @torch.no_grad()
    def put(self, slot: int, factors: dict[str, LowRank]) -> None:
        """Install an adapter (adapters.lowrank factors over this model) in `slot`, replacing what it held."""
        kinds = {f.selects for f in factors.values()}
        if len(kinds) != 1:
            raise ValueError("an adapter's modules are all low-rank or all column selections")
        for name, f in factors.items():   # check every module before changing any
            if name in self.modules:
                continue
            self._wrap(name, f)
        for name, module in self.modules.items():
            module.put(slot, factors.get(name))
        self.selects[slot] = kinds.pop()

    def clear(self, slot: int) -> None:
        for module in self.modules.values():
            module.put(slot, None)

    @contextmanager
    def route(self, routing: Routing):
        previous, self.routing = self.routing, routing
        try:
            yield
        finally:
            self.routing = previous
