"""Running the jobs of :mod:`.jobs` in napari thread workers, with a stop flag and a "finished" flag.

The stop flag (a ``threading.Event``) is what the core's generators check
between steps, so a cancel lands within one step and the core's own clean-up
runs (nothing half-written). The finished flag lets the widget wait for a
worker when the viewer is closing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from napari.qt.threading import GeneratorWorker, create_worker


def _guarded(job: Callable[..., Generator], finished: threading.Event, *args, **kwargs) -> Generator:
    try:
        return (yield from job(*args, **kwargs))
    finally:
        finished.set()


@dataclass
class Job:
    """A running job: its worker and its two flags."""

    kind: str
    worker: GeneratorWorker
    stop: threading.Event
    finished: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.stop.set()

    def wait(self, timeout_s: float) -> bool:
        return self.finished.wait(timeout_s)


def start_job(
    kind: str,
    job: Callable[..., Generator],
    *args,
    on_yield: Callable[[object], None] | None = None,
    on_return: Callable[[object], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
    **kwargs,
) -> Job:
    """Start ``job(*args, stop=..., **kwargs)`` in a GeneratorWorker and connect the handlers (GUI thread)."""
    stop = stop if stop is not None else threading.Event()
    finished = threading.Event()
    # errors go to on_error (a notification), never re-raised into the Qt event loop
    worker = create_worker(
        _guarded, job, finished, *args, stop=stop, _start_thread=False, _ignore_errors=True, **kwargs
    )
    if on_yield is not None:
        worker.yielded.connect(on_yield)
    if on_return is not None:
        worker.returned.connect(on_return)
    if on_error is not None:
        worker.errored.connect(on_error)
    if on_finish is not None:
        worker.finished.connect(on_finish)
    handle = Job(kind, worker, stop, finished)
    worker.start()
    return handle
