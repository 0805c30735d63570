"""The widget's jobs without a viewer: error messages, library names, cancel before the first step."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("napari")

from napari_convlora._napari import jobs
from napari_convlora.adapt import AdaptConfig
from napari_convlora.errors import InputError


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
    job = jobs.adapt_job(model_file, small_volume, AdaptConfig(slices=2, epochs=1, device="cpu"), "never", stop)
    with pytest.raises(StopIteration) as end:
        next(job)
    assert end.value.value is None
    assert not (tmp_path / "adapters").exists()
