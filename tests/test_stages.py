"""Resumable pipeline stages (pipeline/stages.py) and their typed records, without Ray or a store."""

from __future__ import annotations

import json

from scmm_atlas.pipeline.outputs import Ingested, Published, Trained
from scmm_atlas.pipeline.stages import STATE_FILE, StageRecords
from scmm_atlas.store.results.spec import ResultRecord


def test_a_finished_stage_is_read_back_as_its_record_and_skipped(tmp_path):
    calls = []

    def work() -> Ingested:
        calls.append(1)
        return Ingested(n_new=5, n_total=5, modalities={"RNA": 5})

    first = StageRecords(str(tmp_path)).run("ingest", {"a": 1}, work, lambda out: True, kind=Ingested)
    saved = json.loads((tmp_path / STATE_FILE).read_text())["stages"]["ingest"]["outputs"]
    assert saved == {"n_new": 5, "n_total": 5, "modalities": {"RNA": 5}}  # plain JSON in pipeline.json
    again = StageRecords(str(tmp_path)).run("ingest", {"a": 1}, work, lambda out: out.n_total == 5, kind=Ingested)
    assert again == first and isinstance(again, Ingested) and calls == [1]


def test_changed_inputs_missing_outputs_or_force_run_the_stage_again(tmp_path):
    calls = []

    def work() -> Ingested:
        calls.append(1)
        return Ingested(n_new=len(calls), n_total=len(calls), modalities={})

    records = StageRecords(str(tmp_path))
    records.run("ingest", {"a": 1}, work, lambda out: True, kind=Ingested)
    assert records.run("ingest", {"a": 2}, work, lambda out: True, kind=Ingested).n_new == 2  # new inputs
    assert records.run("ingest", {"a": 2}, work, lambda out: False, kind=Ingested).n_new == 3  # outputs gone
    assert records.run("ingest", {"a": 2}, work, lambda out: True, kind=Ingested, force=True).n_new == 4
    assert records.run("ingest", {"a": 2}, work, lambda out: True, kind=Ingested).n_new == 4  # now recorded


def test_a_record_of_another_shape_is_not_trusted(tmp_path):
    """A pipeline.json written by an older version (other keys) makes the stage run again, not crash."""
    records = StageRecords(str(tmp_path))
    records.run("train", {"a": 1}, lambda: Ingested(n_new=1, n_total=1, modalities={}), lambda out: True,
                kind=Ingested)
    trained = Trained(run_id="r", run_name="n", model_name="m", version="1", champion=True, best_val=1.5, epochs=3,
                      train_s=2.0, model_uri="models:/m/1")
    assert StageRecords(str(tmp_path)).run("train", {"a": 1}, lambda: trained, lambda out: True,
                                           kind=Trained) == trained


def test_nested_records_survive_pipeline_json_and_ran_lists_what_ran(tmp_path):
    record = ResultRecord(entry="v2-0123abcd", version="2", model_uri="models:/m/2", time="t", n_cells=7,
                          pairs=(("RNA", "ADT"),), library_size=1e4)
    published = Published(record=record, cells_per_s=10.0)
    first = StageRecords(str(tmp_path))
    first.run("infer", {"a": 1}, lambda: published, lambda out: True, kind=Published)
    assert first.ran == ["infer"]
    again = StageRecords(str(tmp_path))
    back = again.run("infer", {"a": 1}, lambda: None, lambda out: out.record.entry == "v2-0123abcd", kind=Published)
    assert back == published and isinstance(back.record, ResultRecord) and again.ran == []
    state = json.loads((tmp_path / STATE_FILE).read_text())
    state["stages"]["infer"]["outputs"]["record"].pop("n_cells")  # a record of an older shape: run again
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    rerun = StageRecords(str(tmp_path))
    assert rerun.run("infer", {"a": 1}, lambda: published, lambda out: True, kind=Published) == published
    assert rerun.ran == ["infer"]
