"""The workspace layout's one freshness rule and one atomic write."""

import json

import pytest

from engine.layout import Layout, Provenance, Run, atomic_output, forget, is_current, key_file, mark_current, output_key


def test_atomic_output_replaces_a_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "table.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(path) as partial:
        partial.write_text("half")
        raise RuntimeError("killed midway")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_output(path) as partial:
        assert partial != path and partial.parent == path.parent
        partial.write_text("new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_atomic_output_swaps_a_folder_in_whole(tmp_path):
    folder = tmp_path / "analysis"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_output(folder) as partial:
        partial.mkdir()
        (partial / "new.txt").write_text("new")
        raise ValueError("bad input")
    assert [path.name for path in folder.iterdir()] == ["old.txt"] and list(tmp_path.iterdir()) == [folder]
    with atomic_output(folder) as partial:
        partial.mkdir()
        (partial / "new.txt").write_text("new")
    assert [path.name for path in folder.iterdir()] == ["new.txt"] and list(tmp_path.iterdir()) == [folder]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_output_is_current_only_for_the_settings_and_inputs_it_was_marked_with(tmp_path, kind):
    output = tmp_path / "out"
    key = output_key({"threshold": 0.2}, {"images": "abc"})
    assert not is_current(output, key)  # nothing there yet
    output.mkdir() if kind == "folder" else output.write_text("x")
    assert not is_current(output, key)  # there, but never marked
    mark_current(output, key)
    assert is_current(output, key)
    assert key_file(output).parent == (output if kind == "folder" else tmp_path)
    assert json.loads(key_file(output).read_text())["settings"] == {"threshold": 0.2}
    assert not is_current(output, output_key({"threshold": 0.3}, {"images": "abc"}))
    assert not is_current(output, output_key({"threshold": 0.2}, {"images": "abd"}))
    assert is_current(output, output_key({"threshold": 0.2}, {"images": "abc"}))  # equal content, equal key
    forget(output)
    assert not is_current(output, key)


def test_layout_names_every_output_once_and_provenance_reads_typed(tmp_path):
    layout = Layout(tmp_path)
    paths = [layout.demo_cohort, layout.images, layout.features, layout.models.root, layout.relevance,
             layout.validation, layout.associations, layout.report, layout.provenance, layout.lock]
    assert len(set(paths)) == len(paths) and all(path.parent == tmp_path for path in paths)
    assert layout.models.weights(3).name == "member_3.safetensors" and layout.models.members() == []
    assert Provenance.read(layout).last is None
    layout.provenance.write_text(json.dumps({"runs": [{"started": "t0", "catalog": {"train": {"target": "age"}},
                                                       "stages": {"train": {"seconds": 3}}}],
                                             "stages": ["train"]}))
    provenance = Provenance.read(layout)  # an older record: fields it lacks take their defaults
    assert provenance.last.catalog == {"train": {"target": "age"}} and provenance.last.catalog_file == "?"
    assert provenance.stages == ["train"] and provenance.last.stages["train"]["seconds"] == 3
    assert provenance.last.state is None and provenance.last.cluster_usage == {}
    provenance.runs.append(Run(started="t1", catalog_file="c.yaml", catalog_sha256="ab", catalog={}, state="failed",
                               error="ValueError: x"))
    provenance.write(layout)
    again = Provenance.read(layout)
    assert again == provenance and again.last.error == "ValueError: x" and not list(tmp_path.glob(".*.part"))


def test_a_stage_produces_an_output_once_per_key_and_a_failed_write_leaves_the_old_one_not_current(tmp_path):
    from pipelines.stages import Stage

    folder, writes = tmp_path / "validation", []

    def write(partial, text="first"):
        writes.append(partial)
        partial.mkdir()
        (partial / "scores.txt").write_text(text)

    assert Stage.produce(folder, {"atlas": "a"}, {"maps": "1"}, write)
    assert (folder / "scores.txt").read_text() == "first" and writes[0] != folder  # written beside, then renamed
    assert is_current(folder, output_key({"atlas": "a"}, {"maps": "1"}))
    assert not Stage.produce(folder, {"atlas": "a"}, {"maps": "1"}, write) and len(writes) == 1  # current: kept

    def killed(partial):
        partial.mkdir()
        (partial / "scores.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage.produce(folder, {"atlas": "a"}, {"maps": "2"}, killed)  # new maps, and the write dies
    assert (folder / "scores.txt").read_text() == "first"  # the old output whole ...
    assert not is_current(folder, output_key({"atlas": "a"}, {"maps": "1"}))  # ... but no longer current
    assert Stage.produce(folder, {"atlas": "a"}, {"maps": "1"}, lambda partial: write(partial, "again"))
    assert (folder / "scores.txt").read_text() == "again" and sorted(path.name for path in tmp_path.iterdir()) == [
        "validation"]
