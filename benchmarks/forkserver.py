"""A fork server for the CPU cells: torch and flashdml are imported once, each cell still gets its own process.

Starting a fresh interpreter per cell costs several seconds on a loaded 2-core machine (mostly ``import torch``),
more than the timing of a quick cell. The server (``python -m benchmarks --_forkserver``) imports torch,
flashdml and the op modules but runs no tensor op (so no OpenMP thread pool exists to be broken by fork), then
forks one child per request; the child is a process of its own (own process group, own memory high-water
mark, own threads) that runs ``harness.worker_main`` exactly like a fresh ``--_worker`` subprocess would.

Protocol, one JSON request per line on the server's stdin: {"spec": <worker spec JSON>, "out": path,
"err": path}; the server answers "pid N" once the child exists and "exit CODE" when it has ended (CODE as
subprocess.Popen.returncode: negative for a signal). CUDA cells never come here: CUDA must not be
initialised before a fork.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys


def serve(ops: list[str]) -> int:
    """The server's main loop (in its own process)."""
    from . import harness

    harness.ensure_flashdml_importable()
    import torch  # noqa: F401

    with contextlib.suppress(Exception):
        import flashdml  # noqa: F401
    for name in ops:  # the op modules and their imports; a broken one fails in its cells as before
        with contextlib.suppress(Exception):
            harness.load_op(name)
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the cell's process
            code = 1
            try:
                os.setpgid(0, 0)  # its own group: the parent kills the cell with everything it started
                for fd, path in ((1, req["out"]), (2, req["err"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                code = harness.worker_main(req["spec"])
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also here, so the group exists before the parent hears the pid
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


class ForkedCell:
    """The part of subprocess.Popen that harness._watch / _kill_group use, for a child of the server."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self):
        if self.returncode is None and self.server.readable(0.0):
            self.returncode = self.server.read_exit()
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = self.server.read_exit()
        return self.returncode


class ForkServer:
    """The parent's handle on a running server; `alive` is False once it has failed (the caller then falls
    back to fresh subprocesses)."""

    def __init__(self, env: dict, cwd: str, ops: list[str], start_timeout_s: float = 300.0):
        cmd = [sys.executable, "-m", "benchmarks", "--_forkserver", json.dumps(ops)]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, bufsize=0)
        self._buf = b""  # answers read from the pipe, not yet consumed (unbuffered reads: select stays true)
        try:
            self.alive = self.readable(start_timeout_s) and self._readline() == "ready"
        except (OSError, RuntimeError):
            self.alive = False
        if not self.alive:
            self.close()

    def readable(self, timeout_s: float) -> bool:
        """A whole answer line is waiting (or arrives within timeout_s)."""
        return b"\n" in self._buf or bool(select.select([self.proc.stdout], [], [], timeout_s)[0])

    def _readline(self) -> str:
        while b"\n" not in self._buf:
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                self.alive = False
                raise RuntimeError("fork server ended")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def read_exit(self) -> int:
        line = self._readline().split()
        if len(line) != 2 or line[0] != "exit":
            self.alive = False
            raise RuntimeError(f"fork server answered {line!r}")
        return int(line[1])

    def start(self, spec_json: str, out_path: str, err_path: str) -> ForkedCell:
        try:
            req = json.dumps({"spec": spec_json, "out": out_path, "err": err_path}) + "\n"
            self.proc.stdin.write(req.encode())
            line = self._readline().split()
            if len(line) != 2 or line[0] != "pid":
                raise RuntimeError(f"fork server answered {line!r}")
            return ForkedCell(self, int(line[1]))
        except (OSError, RuntimeError, ValueError):
            self.alive = False
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
