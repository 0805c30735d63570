"""The widget's jobs without a viewer: error messages, library names, cancel before the first step."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("napari")

from napari_convlora._napari import jobs
from napari_convlora.adapt import AdaptConfig
from napari_convlora.errors import InputError

from .conftest import drive


def test_describe_error():
    assert jobs.describe_error(InputError("scan.nii: no such file")) == "scan.nii: no such file"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert jobs.describe_error(oom, "cuda").startswith("out of memory on cuda: ")
    assert jobs.describe_error(MemoryError()).startswith("out of memory")
    assert jobs.describe_error(RuntimeError("boom\nmore")) == "internal error (RuntimeError: boom); nothing was changed"


def test_library_path_refuses_bad_and_taken_names(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path))
    with pytest.raises(InputError, match="invalid adapter name"):
        jobs.library_path("../escape")
    path = jobs.library_path("site-a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"taken")
    with pytest.raises(InputError, match="already exists"):
        jobs.library_path("site-a")


def test_adapt_job_stopped_before_it_starts_writes_nothing(tmp_path, monkeypatch, model_file, small_volume):
    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path))
    stop = threading.Event()
    stop.set()
    job = jobs.adapt_job(
        model_file, small_volume, AdaptConfig(objective="early-head", slices=2, epochs=1, device="cpu"), "never", stop
    )
    with pytest.raises(StopIteration) as end:
        next(job)
    assert end.value.value is None
    assert not (tmp_path / "adapters").exists()


def test_a_source_segmentation_is_made_once_for_segment_and_the_gate(tmp_path, monkeypatch, model_file, small_volume):
    """Segment, then Segment again, then Adapt: the scan is segmented by the source model only the first time."""
    import numpy as np

    from napari_convlora.adapt import GateProgress
    from napari_convlora.inference import SegmentProgress, segment
    from napari_convlora.model import load_model
    from napari_convlora.selection import mask_confidence

    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path))
    jobs._SOURCE.clear()
    first_reports, first = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event())
    )
    one_run = first_reports[-1].total
    assert all(isinstance(r, SegmentProgress) for r in first_reports) and one_run > 0
    again_reports, again = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event())
    )
    assert again_reports == []  # nothing recomputed
    np.testing.assert_array_equal(again.segmentation.mask, first.segmentation.mask)
    first.segmentation.mask[:] = 1  # the user paints on the first layer: what is kept does not change
    _, third = drive(jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event()))
    np.testing.assert_array_equal(third.segmentation.mask, again.segmentation.mask)
    # another scan (one voxel changed) is not confused with it
    other = type(small_volume)(small_volume.data.copy(), small_volume.affine, small_volume.header)
    other.data[0, 0, 0] += 1.0
    assert jobs.known_source(model_file, other, "cpu") is None
    config = AdaptConfig(objective="early-head", slices=2, epochs=1, device="cpu")
    reports, result = drive(jobs.adapt_job(model_file, small_volume, config, "reuse", threading.Event()))
    gate = [r for r in reports if isinstance(r, GateProgress)]
    assert gate and gate[-1].total == one_run  # only the adapter's run: the source model's was reused
    expected = segment(load_model(model_file), small_volume, device="cpu")
    source_confidence = mask_confidence(expected.probability, expected.mask)
    assert result.done.gate_source_score == pytest.approx(source_confidence, abs=1e-4)


def test_standardising_on_leaves_the_remembered_source_and_auto_reuses_it(
    tmp_path, monkeypatch, model_file, small_volume
):
    """ "on" neither uses nor replaces the plain source mask Adapt reuses; "auto" takes it as its plain run."""
    import numpy as np

    from napari_convlora import selection
    from napari_convlora.inference import segment
    from napari_convlora.model import load_model

    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path))
    jobs._SOURCE.clear()
    _, plain = drive(jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event()))
    remembered = jobs.known_source(model_file, small_volume, "cpu")
    reports, standardized = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event(), standardize="on")
    )
    assert reports and standardized.note.endswith("intensities standardised")
    assert not np.allclose(standardized.segmentation.probability, plain.segmentation.probability)
    assert jobs.known_source(model_file, small_volume, "cpu") is remembered
    runs, iter_segment = [], selection.iter_segment
    monkeypatch.setattr(
        selection, "iter_segment", lambda *a, **k: runs.append(k.get("standardize")) or iter_segment(*a, **k)
    )
    auto_reports, auto = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event(), standardize="auto")
    )
    assert "intensities" in auto.note and "mask confidence" in auto.note
    assert runs == [True, True] and auto_reports[-1].total == auto_reports[-1].done  # head and brain: plain reused
    base = load_model(model_file)
    brain = segment(base, small_volume, device="cpu", standardize=True, brain=standardized.segmentation.mask)
    kept = {"kept": plain.segmentation, "standardised, head": standardized.segmentation, "standardised, brain": brain}
    np.testing.assert_array_equal(auto.segmentation.mask, next(v for k, v in kept.items() if k in auto.note).mask)
    assert jobs.known_source(model_file, small_volume, "cpu") is remembered
    before = remembered.mask.copy()
    auto.segmentation.mask[:] = 1 - auto.segmentation.mask  # the user paints on the layer: what is kept stays
    np.testing.assert_array_equal(remembered.mask, before)


def test_standardising_auto_first_remembers_its_plain_run(tmp_path, monkeypatch, model_file, small_volume):
    """Segment with "auto" before any plain Segment: its plain run is what Adapt's gate and a plain Segment reuse."""
    import numpy as np

    from napari_convlora.inference import segment
    from napari_convlora.model import load_model

    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path))
    jobs._SOURCE.clear()
    both, _ = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event(), standardize="auto")
    )
    remembered = jobs.known_source(model_file, small_volume, "cpu")
    assert remembered is not None
    np.testing.assert_array_equal(remembered.mask, segment(load_model(model_file), small_volume, device="cpu").mask)
    again, _ = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event(), standardize="auto")
    )
    assert again[-1].total < both[-1].total  # the second time only the standardised run is made


def test_mirror_views_neither_use_nor_replace_the_remembered_source(tmp_path, monkeypatch, model_file, small_volume):
    """The remembered source segmentation (Adapt's gate reuses it) is the plain one; --tta 4 runs afresh."""
    import numpy as np

    monkeypatch.setenv("CONVLORA_HOME", str(tmp_path))
    jobs._SOURCE.clear()
    _, plain = drive(jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event()))
    remembered = jobs.known_source(model_file, small_volume, "cpu")
    reports, mirrored = drive(
        jobs.segment_job(model_file, small_volume, jobs.SOURCE_LABEL, "cpu", threading.Event(), tta=4)
    )
    assert reports  # computed, not taken from the cache
    assert mirrored.note.endswith("4 mirror views")
    assert not np.allclose(mirrored.segmentation.probability, plain.segmentation.probability)
    assert jobs.known_source(model_file, small_volume, "cpu") is remembered
