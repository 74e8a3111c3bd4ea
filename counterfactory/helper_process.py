"""The driver's helper process: the shortcut audit's work beside the stream (issue 27).

A run in one process (the plain loop, ``local=True``) keeps one core busy with the stages; the
audit's per-sample statistics (~11 ms per sampled sample) and its fits at publish (~2 s, while
the card's plots take ~1 s) are Python and numpy that would hold the same interpreter's lock.
So the driver of such a run starts one worker process when its audit is on (``start``, from
``audit_features.write_plan``), which imports scikit-learn while the stream runs and then takes
the sampled samples' statistics from the writer and the audit's fits from publish; the driver
keeps the stages, the encoder, the writer and the plots. A Ray run's writers are Ray tasks in
other processes that compute their statistics where they run: its driver starts no helper (one
already up in the process still takes publish's fits). The same functions run either way, so the
numbers are the same (same bytes in).

loky's ``ProcessPoolExecutor`` (the executor scikit-learn's joblib ships): its workers start as
fresh interpreters that do not re-import the caller's ``__main__`` (a script without a
``__name__`` guard stays safe), and a dead worker is a ``BrokenProcessPool`` on its futures, not
a hang. Whatever goes wrong with the helper (it cannot start, it dies), the caller computes the
same thing itself (``run``/``result``): the helper only moves work, it never decides it. The
worker leaves when the driver dies (a parent watch), and at the driver's exit (killed: its queued
work is nobody's then, ``_at_exit``).
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

# what the helper imports when it starts, before any work: the audit's fits (~1.5 s of
# scikit-learn, which pulls scipy.stats and pandas) and its statistics
WARM_IMPORTS = ("counterfactory.audit", "sklearn.linear_model", "sklearn.metrics", "sklearn.model_selection",
                "sklearn.pipeline", "sklearn.preprocessing", "sklearn.feature_extraction.text", "threadpoolctl")
_PARENT_POLL_S = 1.0

_lock = threading.Lock()
_executor: Any = None
_failed = False  # it could not start or it died: this process computes everything itself


def _forked() -> None:
    """In a child forked from a driver (``os.fork``, a fork-started ``multiprocessing`` pool):
    the helper is the parent's, and the executor copied here has no thread to run it, so work
    submitted to it would wait forever. The child computes everything itself (starting a loky
    pool inside a fork of one is not worth its risks for what the helper saves)."""
    global _executor, _failed, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _executor, _failed = None, True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _init(parent: int) -> None:
    """In the worker: one thread for OpenCV and BLAS (it is one process beside a busy driver, and
    small products on idle BLAS threads cost more than they save), a watch that ends the worker
    when its driver is gone, then the imports."""
    import cv2

    # a Ctrl-C at a terminal reaches the whole process group: the driver handles it (and ends
    # this worker at its exit); here it would only print a traceback of whatever was running
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    except ImportError:  # pragma: no cover - scikit-learn requires it
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="counterfactory-parent-watch", daemon=True).start()
    for name in WARM_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an import that fails here fails again where it is needed
            pass


def _noop() -> None:
    return None


def start() -> bool:
    """Start the helper once per process (later calls: whether it is up). Never raises: a helper
    that cannot start leaves this process to compute what it would have."""
    global _executor, _failed
    with _lock:
        if _executor is not None or _failed:
            return _executor is not None
        if _cpus() < 2:  # nothing beside the stream to run on: it would only add its start-up
            _failed = True
            return False
        try:
            from loky import ProcessPoolExecutor

            _executor = ProcessPoolExecutor(max_workers=1, initializer=_init, initargs=(os.getpid(),))
            _executor.submit(_noop)  # the worker starts (and imports) now, while the stream runs
        except Exception:  # noqa: BLE001 - see the docstring
            _executor, _failed = None, True
            return False
        try:
            # after loky's own hook (registered by the submit above): these run in reverse order
            threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # pragma: no cover - Python < 3.9, or exiting already
            atexit.register(_at_exit)
        return True


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def running() -> bool:
    return _executor is not None


def submit(fn: Callable[..., Any], *args: Any) -> Future | None:
    """``fn(*args)`` on the helper (a module-level function, arguments that pickle), or None
    when there is no helper: the caller runs it itself."""
    ex = _executor
    if ex is None:
        return None
    try:
        return ex.submit(fn, *args)
    except Exception:  # noqa: BLE001 - a broken or shut down pool: the caller computes it
        _give_up()
        return None


def result(fut: Future | None, fn: Callable[..., Any], *args: Any) -> Any:
    """The result of ``submit(fn, *args)``, or ``fn(*args)`` computed here when the helper was
    not there or failed (whatever it raised: a dead worker, or an error ``fn`` raises here too)."""
    if fut is not None:
        try:
            return fut.result()
        except Exception as exc:  # noqa: BLE001 - see the docstring: computed here, errors raised here
            if _is_broken(exc):
                _give_up()
    return fn(*args)


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, on the helper when there is one (this thread waits for it)."""
    return result(submit(fn, *args), fn, *args)


def _is_broken(exc: BaseException) -> bool:
    """A dead or shut down pool (loky's TerminatedWorkerError is a BrokenProcessPool)."""
    from concurrent.futures.process import BrokenProcessPool

    from loky.process_executor import ShutdownExecutorError

    return isinstance(exc, BrokenProcessPool | ShutdownExecutorError)


def _give_up() -> None:
    global _executor, _failed
    with _lock:
        ex, _executor, _failed = _executor, None, True
    if ex is not None:
        try:
            ex.shutdown(wait=False, kill_workers=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass


def _at_exit() -> None:
    """At the interpreter's exit: whatever the helper still has queued is nobody's now (a run
    interrupted mid-stream, a publish that raised while its audit ran there), so the worker is
    killed, not waited for. loky's own exit hook joins its manager thread, which lets the worker
    finish every queued task first (an interrupted publish waited for the whole audit); this one
    runs before it. A thread still running a pipeline then computes its work itself (``result``)."""
    _give_up()


def shutdown() -> None:
    """Stop the helper, its queue done first (tests; the interpreter's exit kills it instead:
    ``_at_exit``). A later ``start`` starts a new one."""
    global _executor
    with _lock:
        ex, _executor = _executor, None
    if ex is not None:
        ex.shutdown(wait=True)
