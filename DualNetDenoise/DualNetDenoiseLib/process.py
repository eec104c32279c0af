"""A small child-process runner: reader thread, progress-line parsing, process-tree kill.

The Slicer panel polls :meth:`ProcessRunner.poll` from a ``QTimer`` (GUI thread), a batch
script calls :meth:`ProcessRunner.wait`. Qt is never imported here; the process factory is
injectable (``popen=``) so the runner is testable with a fake process.

Progress protocol: the child prints lines ``DUALNET_PROGRESS {"fraction": 0.5, "message": "..."}``
(the same lines the ``dualnet`` CLI prints with ``--progress-json``); every other line is kept
as log output. A child that fails prints ``DUALNET_ERROR <one line>`` before exiting non-zero.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence

PROGRESS_PREFIX = "DUALNET_PROGRESS"
ERROR_PREFIX = "DUALNET_ERROR"


def format_progress_line(fraction: float, message: str = "", **extra) -> str:
    """The line a child prints to report progress (no trailing newline)."""
    payload = {"fraction": round(float(fraction), 6), "message": message}
    payload.update(extra)
    return f"{PROGRESS_PREFIX} {json.dumps(payload)}"


def parse_progress_line(line: str) -> Optional[dict]:
    """The JSON payload of a progress line, or None for any other line (or bad JSON)."""
    text = line.strip()
    if not text.startswith(PROGRESS_PREFIX):
        return None
    try:
        payload = json.loads(text[len(PROGRESS_PREFIX):].strip())
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def parse_error_line(line: str) -> Optional[str]:
    text = line.strip()
    return text[len(ERROR_PREFIX):].strip() if text.startswith(ERROR_PREFIX) else None


def child_process_options(windows: Optional[bool] = None, sp=subprocess) -> dict:
    """``Popen`` keyword arguments for a child of the panel.

    POSIX: a new session (so :func:`kill_process_tree` can kill the whole group). Windows: a new
    process group and no console window (``CREATE_NO_WINDOW`` plus a hidden-window
    ``STARTUPINFO``, as ``slicer.util.launchConsoleProcess`` does), so no black window pops up.
    ``sp`` is the ``subprocess`` module (injectable: the Windows branch is tested on any OS).
    """
    if windows is None:
        windows = os.name == "nt"
    if not windows:
        return {"start_new_session": True}
    info = sp.STARTUPINFO()
    info.dwFlags |= getattr(sp, "STARTF_USESHOWWINDOW", 0x1)
    info.wShowWindow = 0  # SW_HIDE
    flags = getattr(sp, "CREATE_NEW_PROCESS_GROUP", 0x200) | getattr(sp, "CREATE_NO_WINDOW", 0x08000000)
    return {"creationflags": flags, "startupinfo": info}


def kill_process_tree(proc) -> None:
    """Stop ``proc`` and every process it started.

    Uses ``psutil`` when present; otherwise the process group (POSIX, the child is started in a
    new session) or ``taskkill /T`` (Windows). Never kills by name.
    """
    pid = getattr(proc, "pid", None)
    if pid is None:
        return
    try:
        import psutil  # type: ignore

        try:
            parent = psutil.Process(pid)
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in children + [parent]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children + [parent], timeout=5)
        return
    except ImportError:
        pass
    if os.name == "nt":  # pragma: no cover - Windows only
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, **child_process_options(True))
        return
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.kill()
        except Exception:
            pass


class ProcessRunner:
    """Run ``args`` in a child process and collect its output without blocking the caller.

    Args:
        args: command line (list).
        on_progress: called with the parsed payload of each progress line (on :meth:`poll`).
        on_output: called with every other output line (on :meth:`poll`).
        popen: process factory with ``subprocess.Popen``'s signature (injectable for tests).
        env, cwd: passed to the factory.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        on_progress: Optional[Callable[[dict], None]] = None,
        on_output: Optional[Callable[[str], None]] = None,
        popen: Callable = subprocess.Popen,
        env: Optional[dict] = None,
        cwd: Optional[str] = None,
    ) -> None:
        self.args = [str(a) for a in args]
        self.on_progress = on_progress
        self.on_output = on_output
        self._popen = popen
        self._env = env
        self._cwd = cwd
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._reader_done = False
        self.proc = None
        self.lines: List[str] = []
        self.error_message: Optional[str] = None
        self.last_progress: Optional[dict] = None
        self.returncode: Optional[int] = None
        self.cancelled = False
        self._kill_at: Optional[float] = None  # a graceful stop's deadline (time.monotonic())

    def start(self) -> "ProcessRunner":
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      universal_newlines=True, bufsize=1, env=self._env, cwd=self._cwd)
        kwargs.update(child_process_options())
        self.proc = self._popen(self.args, **kwargs)
        self._thread = threading.Thread(target=self._read, name="DualNetProcessReader", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            for line in iter(self.proc.stdout.readline, ""):
                self._queue.put(line.rstrip("\r\n"))
        except (ValueError, OSError):  # stream closed by a kill
            pass
        finally:
            self._queue.put(None)

    def poll(self) -> Optional[int]:
        """Dispatch the lines read so far; the exit code once the child ended and all lines are in."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._reader_done = True
                continue
            self._dispatch(line)
        if self._reader_done and self.returncode is None:
            self.returncode = self.proc.wait()
        if self.returncode is None and self._kill_at is not None and time.monotonic() > self._kill_at:
            self._kill_at = None  # the graceful stop's time is up
            kill_process_tree(self.proc)
        return self.returncode

    def _dispatch(self, line: str) -> None:
        payload = parse_progress_line(line)
        if payload is not None:
            self.last_progress = payload
            if self.on_progress:
                self.on_progress(payload)
            return
        err = parse_error_line(line)
        if err is not None:
            self.error_message = err
        self.lines.append(line)
        if self.on_output:
            self.on_output(line)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> int:
        """Block until the child ends (polling); on timeout kill it and raise ``TimeoutError``."""
        start = time.monotonic()
        while True:
            code = self.poll()
            if code is not None:
                return code
            if timeout is not None and time.monotonic() - start > timeout:
                self.cancel()
                raise TimeoutError(f"process did not finish within {timeout} s: {' '.join(self.args)}")
            time.sleep(interval)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    def cancel(self, grace_s: float = 0.0, ask: Optional[Callable[[], None]] = None) -> None:
        """Stop the child and its children; :meth:`poll` then returns a non-zero code.

        ``grace_s`` > 0: ask the child to stop so that it can finish cleanly (a training run writes its
        checkpoint) - with ``ask()`` (e.g. a stop file the child watches), else SIGTERM (POSIX) - and
        kill the tree only if it still runs ``grace_s`` seconds later (checked by :meth:`poll`; a
        second cancel keeps the first deadline). 0, or no way to ask (Windows without ``ask``): kill
        at once."""
        if self.proc is None or self.returncode is not None:
            return
        self.cancelled = True
        if self._kill_at is not None:
            return  # already asked: the deadline stands
        if grace_s > 0 and self._ask_to_stop(ask):
            self._kill_at = time.monotonic() + grace_s
            return
        kill_process_tree(self.proc)

    def _ask_to_stop(self, ask: Optional[Callable[[], None]]) -> bool:
        """Ask the child to stop (``ask``, else SIGTERM on POSIX); False when it cannot be asked."""
        try:
            if ask is not None:
                ask()
            elif os.name != "nt":
                self.proc.send_signal(signal.SIGTERM)
            else:  # CTRL_BREAK cannot reach a child without a console
                return False
        except (AttributeError, ValueError, OSError):
            return False
        return True

    def failure_message(self) -> str:
        """One line describing why the child failed (its DUALNET_ERROR line or its last output)."""
        if self.cancelled:
            return "cancelled by the user"
        if self.error_message:
            return self.error_message
        tail = [line for line in self.lines if line.strip()][-5:]
        if self.returncode is not None and self.returncode < 0:  # killed by a signal; its last words too
            name = {9: "SIGKILL", 15: "SIGTERM"}.get(-self.returncode, f"signal {-self.returncode}")
            hint = " (out of memory? the system's OOM killer sends SIGKILL)" if self.returncode == -9 else ""
            return f"the process was killed by {name}{hint}" + (": " + " | ".join(tail) if tail else "")
        return f"process exited with code {self.returncode}" + (": " + " | ".join(tail) if tail else "")


def python_executable() -> str:
    """The Python to run child scripts with: ``PythonSlicer`` beside Slicer when present, else this one."""
    exe_dir = os.path.dirname(sys.executable)
    for name in ("PythonSlicer.exe", "PythonSlicer"):
        candidate = os.path.join(exe_dir, name)
        if os.path.exists(candidate):
            return candidate
    import shutil

    return shutil.which("PythonSlicer") or sys.executable
