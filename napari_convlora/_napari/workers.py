"""Running the jobs of :mod:`.jobs` in napari thread workers, with a stop flag and a "finished" flag.

With a :class:`.job_process.JobProcess` the thread worker only relays: the job
runs in the worker process and its reports come back through the thread, to
the same handlers on the GUI thread.

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

from .job_process import JobProcess


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
    process: JobProcess | None = None,
    **kwargs,
) -> Job:
    """Start ``job(*args, stop=..., **kwargs)`` in a GeneratorWorker and connect the handlers (GUI thread).

    With ``process`` the job runs there (``kind`` names it) and the worker relays its reports.
    """
    stop = stop if stop is not None else threading.Event()
    finished = threading.Event()
    if process is not None:
        job, args = process.run, (kind, job, *args)
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
