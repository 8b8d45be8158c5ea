"""The generalization measures of "Beyond LoRA" for an adapted model (pure PyTorch; no Ray, no MLflow).

- `mean_loss` / `generalization_gap`: test loss minus training loss, both in eval mode on fixed example sets;
- `bound_terms`: the method-dependent term of the information-theoretic bound (the paper's Table 1);
- `spectrum`: singular values of an update dW = W - W0, its effective rank, norms and alignment with W0's
  top singular subspace;
- `intruder_dimensions`: fine-tuned singular vectors unlike every pretrained one (Shuttleworth et al. 2024);
- `updates`: per adapted matrix, the pretrained W0 and the update dW of a saved adapter.
The maths and its sources: docs/specs/adaptation-methods.md ("Generalisation measures"). The loss landscape
needs a model and data on a worker: workers/training/landscape.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from adapters import targets as injector
from adapters.config import AdapterConfig
from adapters.lowrank import WEIGHTS_FILE, base_weight, read_factors, read_meta
from adapters.methods import METHODS

EPS_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))   # intruder curves: eps = 0.1 .. 0.9
# Which dimension sum S each method's bound counts (docs/specs/adaptation-methods.md): A and B trained
# count both sides of each matrix, B alone its rows, full fine-tuning every weight.
BOTH_SIDES = {name for name, spec in METHODS.items() if spec.train_a}


# ---- the empirical gap -----------------------------------------------------------------------------------

@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """The mean per-example loss of `model(**batch).loss` over `batches` in eval mode (each batch's mean loss
    weighted by its examples); the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    total, examples = 0.0, 0
    try:
        for batch in batches:
            n = len(next(iter(batch.values())))
            total += float(model(**batch).loss) * n
            examples += n
    finally:
        model.train(was_training)
    if not examples:
        raise ValueError("mean_loss: no examples in the batches")
    return total / examples


@dataclass(frozen=True)
class Gap:
    train_loss: float
    test_loss: float

    @property
    def gap(self) -> float:
        return self.test_loss - self.train_loss


def generalization_gap(model: nn.Module, train_batches, test_batches) -> Gap:
    """Test loss minus training loss of `model`, both measured in eval mode on fixed example sets (not the
    running training loss, which mixes dropout and weights from every step)."""
    return Gap(mean_loss(model, train_batches), mean_loss(model, test_batches))


# ---- the bound -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BoundTerms:
    """The Table-1 term sqrt(2 r q sigma^2 [k] ln2 S / |N|) and its factors."""

    method: str
    S: int                 # sum over adapted matrices of (m_i + n_i), n_i, or n_i m_i (full)
    rank: int              # r (1 for full: S already counts every weight)
    segments: int          # k (1 for methods that are not chained)
    bits: int              # q, the bit width of a trained weight
    sigma: float           # the loss's sub-Gaussian parameter
    n_examples: int        # |N|, the training examples

    @property
    def trained_bits(self) -> int:
        """r q k S: the bits the training can write, which bound the mutual information (in bits)."""
        return self.rank * self.bits * self.segments * self.S

    @property
    def term(self) -> float:
        return math.sqrt(2 * self.sigma ** 2 * math.log(2) * self.trained_bits / self.n_examples)


def bound_terms(method: str, shapes: Iterable[tuple[int, int]], rank: int, chain_segments: int = 3,
                n_examples: int = 1, bits: int = 32, sigma: float = 1.0) -> BoundTerms:
    """The method-dependent term of the bound for adapted matrices of `shapes` ((n_i rows out, m_i columns
    in) each): S = sum (m_i + n_i) where A and B are trained (lora, lora_plus, cola), sum n_i where only B
    (or PaCA's columns) is (asym, rac, cla, r_cla, c3la, r_c3la, paca), sum n_i m_i for full fine-tuning;
    chained methods (cola, rac, c3la, r_c3la) multiply by their k segments."""
    if method not in METHODS:
        raise ValueError(f"bound_terms: unknown method {method!r}; valid: {', '.join(METHODS)}")
    shapes = [(int(n), int(m)) for n, m in shapes]
    if not shapes:
        raise ValueError("bound_terms: no adapted matrix shapes")
    if rank < 1 or chain_segments < 1 or n_examples < 1 or bits < 1 or sigma <= 0:
        raise ValueError(f"bound_terms: rank, chain_segments, n_examples and bits must be >= 1 and sigma > 0, "
                         f"got {rank}, {chain_segments}, {n_examples}, {bits}, {sigma}")
    spec = METHODS[method]
    if spec.layer == "full":
        s, rank = sum(n * m for n, m in shapes), 1
    elif method in BOTH_SIDES:
        s = sum(n + m for n, m in shapes)
    else:
        s = sum(n for n, _ in shapes)
    return BoundTerms(method, s, rank, chain_segments if spec.chained else 1, bits, sigma, n_examples)


# ---- spectra ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spectrum:
    singular_values: torch.Tensor   # of dW, descending
    effective_rank: float           # exp(entropy of sigma_i / sum sigma) (Roy & Vetterli 2007)
    stable_rank: float              # ||dW||_F^2 / ||dW||_2^2
    spectral_norm: float
    frobenius_norm: float
    alignment: float                # ||U0_k^T dW V0_k||_F / ||dW||_F, W0's top-k singular subspaces
    k: int


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above the usual float32 tolerance (max(n, m) * eps * sigma_max)."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > max(shape) * torch.finfo(torch.float32).eps * s[0]).sum())


def spectrum(w0: torch.Tensor, w: torch.Tensor, k: int | None = None) -> Spectrum:
    """The update dW = w - w0 (both (n, m)): its singular values, effective and stable rank, spectral and
    Frobenius norms, and how much of it lies in W0's top-k singular subspaces (k: dW's numerical rank by
    default, at least 1; 1.0 when dW only moves W0's top directions, ~k^2 / (n m) for a random one)."""
    if w0.shape != w.shape or w0.dim() != 2:
        raise ValueError(f"spectrum: w0 and w must be matrices of one shape, got {tuple(w0.shape)} and "
                         f"{tuple(w.shape)}")
    w0, dw = w0.double(), w.double() - w0.double()
    s = torch.linalg.svdvals(dw)
    fro = float(s.norm())
    if fro == 0:
        return Spectrum(s.float(), 0.0, 0.0, 0.0, 0.0, 0.0, 0)
    p = s / s.sum()
    p = p[p > 0]
    k = k or max(1, numerical_rank(s, tuple(dw.shape)))
    u0, _, v0h = torch.linalg.svd(w0, full_matrices=False)
    inside = u0[:, :k].T @ dw @ v0h[:k].T
    return Spectrum(s.float(), float(torch.exp(-(p * p.log()).sum())), fro ** 2 / float(s[0]) ** 2, float(s[0]),
                    fro, float(inside.norm()) / fro, k)


@dataclass(frozen=True)
class Intruders:
    """For each of the top-k left singular vectors of W, its largest |cosine| with any of W0's."""

    max_cosine: torch.Tensor        # (k,)

    def count(self, eps: float) -> int:
        return int((self.max_cosine < eps).sum())

    def curve(self, eps_grid: Iterable[float] = EPS_GRID) -> list[tuple[float, int]]:
        return [(float(e), self.count(e)) for e in eps_grid]


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, k: int = 10) -> Intruders:
    """Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
    a top-k singular vector of the fine-tuned W whose largest |cosine| with every singular vector of W0 is
    below eps. `Intruders.count(eps)` counts them; `.curve()` over eps in 0.1 .. 0.9."""
    if w0.shape != w.shape or w0.dim() != 2:
        raise ValueError(f"intruder_dimensions: w0 and w must be matrices of one shape, got {tuple(w0.shape)} "
                         f"and {tuple(w.shape)}")
    k = min(k, min(w.shape))
    u0 = torch.linalg.svd(w0.double(), full_matrices=False)[0]
    u = torch.linalg.svd(w.double(), full_matrices=False)[0][:, :k]
    return Intruders((u.T @ u0).abs().amax(dim=1).float())


# ---- a saved adapter's updates --------------------------------------------------------------------------

@torch.no_grad()
def updates(model: nn.Module, path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (W0, dW)} as float32 CPU (n, m) matrices for the adapted modules of the saved sparta
    adapter at `path` over `model`, its unmodified base (left unchanged). Every method but full: dW is the
    adapter's whole low-rank update (chained segments summed; GPT-2's q/v parts on the fused c_attn).
    full: the targets the low-rank methods would adapt (the config's), dW = trained - pretrained."""
    meta = read_meta(path)
    config = AdapterConfig.from_dict(meta["config"])
    if config.spec.layer != "full":
        _, factors = read_factors(path, model)
        return {name: (base_weight(model, name).detach().float().cpu().clone(), f.delta().cpu())
                for name, f in factors.items()}
    names = [t.name for t in injector.resolve(model, config.targets, config.rank, config.head)]
    before = {name: base_weight(model, name).detach().float().cpu().clone() for name in names}
    trained = {k[len("full."):]: t for k, t in load_file(str(Path(path) / WEIGHTS_FILE)).items()
               if k.startswith("full.")}
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in trained if n in params}
    try:   # read the trained weights through the same accessor, then put the pretrained ones back
        for n in saved:
            params[n].copy_(trained[n])
        return {name: (before[name], base_weight(model, name).detach().float().cpu() - before[name])
                for name in names}
    finally:
        for n, t in saved.items():
            params[n].copy_(t)
