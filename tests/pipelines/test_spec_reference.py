"""The spec reference in docs/ is generated from the pydantic models and cannot drift from them."""
from __future__ import annotations

import pytest
from pydantic import Field

from pipelines import PROJECT_ROOT, spec_reference as sr
from pipelines.serving.spec import AutoscalingSpec, BatchingSpec, KVSpec, SamplingSpec, ServeSpec
from pipelines.serving.spec import SchedulerSpec as ServeSchedulerSpec
from pipelines.sweeps.spec import (DatasetSpec, DeepSpeedSpec, ResourcesSpec, SchedulerSpec, SearchSpec, SweepSpec,
                                   TrainSpec)

# Every model of each spec and where its fields sit, written out here rather than taken from the
# generator's own walk, so that a section the walk missed fails this test.
SECTIONS = {
    "sweep": {"": SweepSpec, "datasets[].": DatasetSpec, "search.": SearchSpec, "train.": TrainSpec,
              "deepspeed.": DeepSpeedSpec, "resources.": ResourcesSpec, "scheduler.": SchedulerSpec},
    "serve": {"": ServeSpec, "kv.": KVSpec, "replicas.": AutoscalingSpec, "batching.": BatchingSpec,
              "scheduler.": ServeSchedulerSpec, "sampling.": SamplingSpec},
}


def test_the_docs_hold_the_current_reference():
    assert sr.stale() == [], "the spec reference in docs/ is stale: run `make docs`"


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_field_of_every_model_is_in_its_doc(name):
    text = (PROJECT_ROOT / sr.SPECS[name].doc).read_text()
    start, end = sr.markers(name)
    block = text[text.index(start):text.index(end)]
    missing = [prefix + field for prefix, model in SECTIONS[name].items() for field in model.model_fields
               if f"| `{prefix}{field}`" not in block]
    assert not missing, f"not in {sr.SPECS[name].doc}: {missing}"


def test_rows_read_types_defaults_and_bounds_from_the_models():
    rows = {r.path: r for _, _, rows in sr.walk(SweepSpec) for r in rows}
    assert rows["train.precision"].constraints == "one of " + ", ".join(
        f"`{v}`" for v in TrainSpec.model_fields["precision"].annotation.__args__)
    max_length = TrainSpec.model_fields["max_length"]
    assert rows["train.max_length"].default == f"`{max_length.default}`"
    assert rows["train.max_length"].constraints == f">= {max_length.metadata[0].ge}"
    assert rows["train.epochs"].type == "integer or null"
    assert rows["experiment"].default == "required" and rows["seeds"].default == "`[0]`"
    serve = {r.path: r for _, _, rows in sr.walk(ServeSpec) for r in rows}
    assert serve["port"].constraints == ">= 1; <= 65535"
    assert serve["replicas"].type == "integer or mapping (`replicas.*`)"
    assert serve["replicas.max"].default == "required"


class PlantedTrain(TrainSpec):
    warmup_steps: int = Field(0, ge=0)


class PlantedSweep(SweepSpec):
    train: PlantedTrain
    notes: str = ""


def test_an_undocumented_field_makes_the_generator_raise():
    with pytest.raises(sr.SpecReferenceError) as e:
        sr.reference(PlantedSweep, sr.SWEEP_FIELDS)
    assert "train.warmup_steps" in str(e.value) and "notes" in str(e.value)


def test_a_description_of_a_field_no_model_has_makes_the_generator_raise():
    with pytest.raises(sr.SpecReferenceError, match="replicas.initial"):
        sr.reference(ServeSpec, {**sr.SERVE_FIELDS, "replicas.initial": "gone"})


def test_an_empty_description_counts_as_missing():
    with pytest.raises(sr.SpecReferenceError, match="kv.ratio"):
        sr.reference(ServeSpec, {**sr.SERVE_FIELDS, "kv.ratio": " "})


def test_check_exits_1_on_a_stale_doc(tmp_path, monkeypatch):
    for spec in sr.SPECS.values():
        (tmp_path / spec.doc).parent.mkdir(parents=True, exist_ok=True)
        start, end = sr.markers(spec.name)
        (tmp_path / spec.doc).write_text(f"# doc\n\n{start}\nold\n{end}\n\nafter\n")
    assert sorted(sr.stale(tmp_path)) == sorted(s.doc for s in sr.SPECS.values())
    sr.write(tmp_path)
    assert sr.stale(tmp_path) == []
    text = (tmp_path / sr.SPECS["serve"].doc).read_text()
    assert text.startswith("# doc\n\n") and text.endswith("\n\nafter\n") and "| `batching.max_batch_size`" in text
    monkeypatch.setattr(sr, "PROJECT_ROOT", tmp_path)
    (tmp_path / sr.SPECS["sweep"].doc).write_text(f"{sr.markers('sweep')[0]}\nold\n{sr.markers('sweep')[1]}\n")
    assert sr.main(["--check"]) == 1


def test_a_doc_without_markers_is_an_error():
    with pytest.raises(sr.SpecReferenceError, match="lacks the markers"):
        sr.render("# no markers here\n", sr.SPECS["sweep"])
