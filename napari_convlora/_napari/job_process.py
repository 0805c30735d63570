"""The widget's jobs in a long-lived worker process, so the model never holds the viewer's GIL.

A job run in a thread of the napari process shares its GIL: every numpy or
scipy call that holds it (resampling, clean-up, metrics) freezes the viewer for
its duration. Here the jobs of :mod:`.jobs` run in a separate Python process
that the widget starts when it opens and that keeps the model loaded between
jobs; it may use every core. Its reports (the core's own progress objects and
results) come back over a private socket pair and are fed to the same napari
thread workers and handlers as before, so the widget does not change.

Wire protocol (pickled tuples; both ends are this module, started by this
module, over an unnamed socket pair: nothing another user can reach):

- parent to child: ``("run", id, kind, args, kwargs)``, ``("stop", id)``, ``("exit",)``;
- child to parent: ``("ready", pid)``, then per job ``(id, "yield", report)``
  ..., and last ``(id, "return", result)`` or ``(id, "error", exception)``.

Cancel sets the job's stop event in the child, which the core's generators
check between steps: the job ends within one step and writes nothing half.
When the parent goes away the child's socket closes and the child exits. When
the child dies (e.g. the out-of-memory killer), the job running then fails,
and the next job starts a new child first (up to ``MAX_RESTARTS`` times; after
that, and if a child cannot start at all, jobs run in threads of the viewer).

This module imports neither Qt nor napari: the child imports it to serve.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Generator
from multiprocessing.connection import Connection

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # importing torch on a cold disk can take tens of seconds
EXIT_WAIT_S = 5.0
MAX_RESTARTS = 2  # children that died under the widget before it gives up on the process path
CHILD_ENV = "CONVLORA_WORKER_PROCESS"  # set in the child: jobs.worker_threads gives it every core


def _send(conn: Connection, lock: threading.Lock, message: tuple) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def _receive(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())  # our own child, over a private socket pair


# ---------------------------------------------------------------- the child
def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the core's InputError does), else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception that cannot cross: its words can
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def compact(result: object) -> object:
    """A job's result without what the widget never shows: the per-voxel probability (4 bytes a voxel)."""
    from ..inference import Segmentation

    if isinstance(result, Segmentation):
        return dataclasses.replace(result, probability=None)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        changes = {
            f.name: compact(getattr(result, f.name))
            for f in dataclasses.fields(result)
            if dataclasses.is_dataclass(getattr(result, f.name))
        }
        return dataclasses.replace(result, **changes) if changes else result
    return result


def _run_job(
    conn: Connection, lock: threading.Lock, job_id: int, job: Callable[..., Generator], args, kwargs, stop
) -> None:
    try:
        running = job(*args, stop=stop, **kwargs)
        while True:
            try:
                report = next(running)
            except StopIteration as finished:
                _send(conn, lock, (job_id, "return", compact(finished.value)))
                return
            _send(conn, lock, (job_id, "yield", report))
    except (OSError, EOFError):  # the parent is gone
        os._exit(0)
    except BaseException as exc:  # every other error goes to the widget, as a notification
        from ..errors import InputError

        if not isinstance(exc, InputError):  # bad input is the user's to fix; anything else is ours to debug
            log.error("napari-convlora worker process: job %s failed", job_id, exc_info=exc)
        try:
            _send(conn, lock, (job_id, "error", _picklable(exc)))
        except (OSError, EOFError):
            os._exit(0)


def serve(conn: Connection) -> None:
    """The child's loop: start each job in its own thread, route stops, exit with the parent."""
    from . import jobs  # torch and the core load here, before "ready": the first job does not wait for them

    table: dict[str, Callable[..., Generator]] = {
        "segment": jobs.segment_job,
        "adapt": jobs.adapt_job,
        "metrics": jobs.metrics_job,
    }
    lock = threading.Lock()
    stops: dict[int, threading.Event] = {}
    threads: list[threading.Thread] = []
    _send(conn, lock, ("ready", os.getpid()))
    while True:
        try:
            message = _receive(conn)
        except (OSError, EOFError):  # the parent is gone: stop now, nothing of ours is half-written
            os._exit(0)
        if message[0] == "run":
            _, job_id, kind, args, kwargs = message
            stops[job_id] = stop = threading.Event()
            thread = threading.Thread(
                target=_run_job, args=(conn, lock, job_id, table[kind], args, kwargs, stop), daemon=True
            )
            threads.append(thread)
            thread.start()
        elif message[0] == "stop":
            if message[1] in stops:
                stops[message[1]].set()
        elif message[0] == "exit":
            for stop in stops.values():
                stop.set()
            for thread in threads:
                thread.join(EXIT_WAIT_S)
            return


def main() -> None:
    """Entry of the child: ``python -m napari_convlora._napari.job_process FD``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conn = Connection(int(sys.argv[1]))
    sys.stdout = sys.stderr  # a stray print lands in the parent's log, as a thread's would
    serve(conn)
    conn.close()


# ---------------------------------------------------------------- the parent
class JobProcess:
    """The widget's handle on its worker process: start it, run jobs in it, stop them, end it.

    :meth:`start` returns at once; the child imports torch in the background.
    A job asked for before the child is ready waits for it; if the child cannot
    start, :attr:`failure` says why and :meth:`run` runs the job in the calling
    thread instead (the old thread path). If a child dies, :attr:`ended` says
    how until the next job starts a new one (:attr:`restarts` counts them).
    """

    def __init__(self) -> None:
        self.failure: str | None = None
        self.ended: str | None = None
        self.restarts = 0
        self._restart_lock = threading.Lock()
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self._ids = itertools.count(1)
        self._inboxes: dict[int, queue.Queue] = {}

    # -- lifecycle
    def start(self) -> None:
        threading.Thread(target=self._start, name="convlora-process-start", daemon=True).start()

    def _start(self) -> None:
        try:
            if os.name != "posix":
                raise OSError("the worker process needs a POSIX system (socket pair passing)")
            ours, theirs = socket.socketpair()
            env = {**os.environ, CHILD_ENV: "1"}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "napari_convlora._napari.job_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
            theirs.close()
            self._conn = Connection(ours.detach())
            if not self._conn.poll(START_TIMEOUT_S):  # a child that hangs must not hang us
                raise TimeoutError(f"no answer within {START_TIMEOUT_S:.0f} s")
            greeting = _receive(self._conn)
            if greeting[0] != "ready":
                raise RuntimeError(f"unexpected greeting {greeting!r}")
            self.pid = int(greeting[1])
        except Exception as exc:  # noqa: BLE001 - any failure to start means the thread path; the widget says so
            self.failure = f"it did not start: {type(exc).__name__}: {exc}"
            log.warning("napari-convlora: no worker process (%s); jobs run in threads", self.failure)
            self._kill()
        else:
            threading.Thread(target=self._dispatch, name="convlora-process-reader", daemon=True).start()
        finally:
            self._ready.set()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S + 5) -> bool:
        """Whether the child is up (blocks until it is, or failed, or the timeout)."""
        self._ready.wait(timeout_s)
        return self._ready.is_set() and self.failure is None and self.alive

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self, wait_s: float = EXIT_WAIT_S) -> None:
        """Ask the child to exit (its jobs stop within one step), then make sure it has."""
        self._closing = True
        self._ready.wait(START_TIMEOUT_S + 5)
        if self._conn is not None and self.alive:
            try:
                _send(self._conn, self._lock, ("exit",))
                self._proc.wait(wait_s)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- jobs
    def _dispatch(self) -> None:
        """Route each message from the child to the inbox of its job; on EOF, fail every job still waiting."""
        conn = self._conn
        while True:
            try:
                job_id, what, payload = _receive(conn)
            except (OSError, EOFError, TypeError, ValueError):
                break
            inbox = self._inboxes.get(job_id)
            if inbox is not None:
                inbox.put((what, payload))
        try:
            code = self._proc.wait(EXIT_WAIT_S) if self._proc is not None else None  # EOF: it is gone or going
        except subprocess.TimeoutExpired:
            code = None
        lost = RuntimeError(f"the worker process ended (exit code {code})")
        if not self._closing:  # the next job starts a new one (see run), or runs in a thread after too many
            self.ended = f"ended (exit code {code})"
            if self.restarts >= MAX_RESTARTS:
                self.failure = f"it {self.ended}" + (f", as did {self.restarts} new one(s)" if self.restarts else "")
        for inbox in list(self._inboxes.values()):
            inbox.put(("error", lost))

    def _restart(self) -> None:
        """A new child in place of one that died (unless :meth:`_dispatch` gave up: :attr:`failure`)."""
        with self._restart_lock:
            if self.ended is None or self.failure is not None:
                return
            self.restarts += 1
            log.warning("napari-convlora: the worker process %s; starting a new one", self.ended)
            self._kill()
            self._ready.clear()
            self.ended = None
            self._start()

    def run(self, kind: str, job: Callable[..., Generator], *args, stop: threading.Event, **kwargs) -> Generator:
        """Run ``job`` (``kind`` names it in the child) there; yield its reports; return its result.

        Called in a napari thread worker. ``stop`` is the worker's stop event: it
        is forwarded to the child when set. If the child is not available the job
        runs here, in this thread.
        """
        if self.ended is not None:
            self._restart()
        if not self.wait_ready():
            return (yield from job(*args, stop=stop, **kwargs))
        job_id = next(self._ids)
        inbox: queue.Queue = queue.Queue()
        self._inboxes[job_id] = inbox
        try:
            _send(self._conn, self._lock, ("run", job_id, kind, args, kwargs))
            stop_sent = False
            while True:
                try:
                    what, payload = inbox.get(timeout=0.05)
                except queue.Empty:
                    what = None
                if stop.is_set() and not stop_sent:
                    _send(self._conn, self._lock, ("stop", job_id))
                    stop_sent = True
                if what == "yield":
                    yield payload
                elif what == "return":
                    return payload
                elif what == "error":
                    raise payload
        except (OSError, EOFError) as exc:
            raise RuntimeError(f"the worker process is gone ({exc})") from exc
        finally:
            self._inboxes.pop(job_id, None)


if __name__ == "__main__":
    main()
