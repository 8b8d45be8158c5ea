"""workers.training.analysis.analyze on a saved adapter over a tiny random Llama: every analysis's metrics
against the measures computed directly, its files, and one copy of the base model."""
import copy
import csv

import pytest
import torch
import transformers as tf

from adapters import AdapterConfig
from adapters.analysis import EPS_GRID, bound_terms, intruder_dimensions, spectrum, updates
from tests.helpers import trained_adapter
from workers.data.assets import tiny_config
from workers.training.analysis import ANALYSES, AnalysisSettings, analyze, check_analyses

IDS = {"train": torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0)),
       "test": torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1))}


def losses(model, split: str) -> float:
    with torch.no_grad():
        return float(model(input_ids=IDS[split], labels=IDS[split]).loss)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    pristine = copy.deepcopy(base)
    handle = trained_adapter(base, AdapterConfig(method="c3la", rank=4), scale=0.05)
    folder = tmp_path_factory.mktemp("adapter")
    handle.save(folder)
    return pristine, handle.model, folder


def test_every_analysis_against_the_measures(saved, tmp_path):
    pristine, trained, folder = saved
    loads = []

    def load_base():
        loads.append(1)
        return copy.deepcopy(pristine)

    m = analyze(folder, load_base, ANALYSES, n_train=1000, out=tmp_path, losses=losses)
    assert loads == [1]
    assert m["analysis/train_eval_loss"] == pytest.approx(losses(trained, "train"), rel=1e-5)
    assert m["analysis/gap"] == pytest.approx(losses(trained, "test") - losses(trained, "train"), rel=1e-4)
    # llama-tiny: q 32 -> 32 and v 32 -> 16 in 2 layers; c3la: 2 segments here, but the bound counts k = 3
    want = bound_terms("c3la", [(32, 32), (16, 32)] * 2, rank=4, chain_segments=3, n_examples=1000)
    assert m["analysis/bound_term"] == pytest.approx(want.term) and m["analysis/bound_S"] == want.S
    moved = updates(pristine, folder)
    spectra = [spectrum(w0, w0 + dw) for w0, dw in moved.values()]
    assert m["analysis/effective_rank_mean"] == pytest.approx(sum(s.effective_rank for s in spectra) / 4, rel=1e-6)
    for eps in EPS_GRID:
        counts = [intruder_dimensions(w0, w0 + dw).count(eps) for w0, dw in moved.values()]
        assert m[f"analysis/intruders_eps{eps:g}"] == sum(counts) / 4
    with (tmp_path / "spectrum.csv").open() as f:
        assert sorted(r["module"] for r in csv.DictReader(f)) == sorted(moved)
    # the landscape's centre is the trained model's training loss; a slice never dips far below a trained
    # point here, and the merged weights' slice starts from the same loss
    with (tmp_path / "landscape-adapter-1d.csv").open() as f:
        line = {float(r["alpha"]): float(r["loss"]) for r in csv.DictReader(f)}
    assert line[0.0] == pytest.approx(losses(trained, "train"), rel=1e-5)
    with (tmp_path / "landscape-merged-1d.csv").open() as f:
        merged = {float(r["alpha"]): float(r["loss"]) for r in csv.DictReader(f)}
    assert merged[0.0] == pytest.approx(line[0.0], rel=1e-5)
    assert m["analysis/landscape_merged_sharpness"] == pytest.approx(max(merged.values()) - merged[0.0], rel=1e-6)
    assert {p.name for p in tmp_path.iterdir()} == {
        "spectrum.csv", "spectrum.png", "intruders.csv", "intruders.png"} | {
        f"landscape-{v}-{d}.{e}" for v in ("adapter", "merged") for d in ("1d", "2d") for e in ("csv", "png")}


def test_names_and_missing_losses_are_refused(saved, tmp_path):
    pristine, _, folder = saved
    assert check_analyses(["bounds"]) == ("bounds",)
    with pytest.raises(ValueError, match="unknown analysis 'hessian'; valid: gap, bounds, spectrum"):
        check_analyses(["gap", "hessian"])
    with pytest.raises(ValueError, match="need `losses`"):
        analyze(folder, lambda: copy.deepcopy(pristine), ["landscape"], n_train=10, out=tmp_path)


def test_settings_size_the_landscape_and_bad_ones_are_named(saved, tmp_path):
    pristine, _, folder = saved
    settings = AnalysisSettings.from_dict({"landscape_points": 5, "landscape_points_2d": 3})
    analyze(folder, lambda: copy.deepcopy(pristine), ["landscape"], n_train=10, out=tmp_path, losses=losses,
            settings=settings)
    with (tmp_path / "landscape-merged-1d.csv").open() as f:
        assert [float(r["alpha"]) for r in csv.DictReader(f)] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with (tmp_path / "landscape-adapter-2d.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 9
    with pytest.raises(ValueError, match="unknown analysis setting 'points'; valid: intruder_k, landscape_points"):
        AnalysisSettings.from_dict({"points": 5})
    with pytest.raises(ValueError, match="landscape_points_2d must be an odd integer >= 3"):
        AnalysisSettings.from_dict({"landscape_points_2d": 4})
    with pytest.raises(ValueError, match="sigma must be > 0"):
        AnalysisSettings(sigma=0.0)
