"""App runners: how the booted CVM starts its app.

- :class:`DockerComposeRunner` (production): ``docker compose -f docker-compose.yaml up
  --remove-orphans -d --build`` in the work dir with the decrypted env, as dstack's
  ``app-compose.sh`` does.
- :class:`LocalProcessRunner` (lab and app developers): runs the compose's ``bash_script``
  (runner ``bash``) as a child in its own session, with the decrypted env; its PID is kept
  in the work dir so that a retried boot does not start it twice.

Both run ``init_script`` and ``pre_launch_script`` first (part of app-compose, so measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gateway.guest.identity import AppCompose

__all__ = ["AppRunner", "DockerComposeRunner", "LocalProcessRunner", "RunnerError"]

logger = logging.getLogger(__name__)


MAX_LOG_BYTES = 1024 * 1024


class RunnerError(RuntimeError):
    """The app (or its pre-launch script) could not be started."""


@dataclass(frozen=True, slots=True)
class Container:
    """One entry of ListContainers."""

    id: str
    names: tuple[str, ...]
    image: str
    state: str
    status: str


class AppRunner(Protocol):
    async def pre_launch(
        self, compose: AppCompose, env: Mapping[str, str], work_dir: Path
    ) -> None: ...

    async def start(self, compose: AppCompose, env: Mapping[str, str], work_dir: Path) -> None: ...

    async def list(self) -> list[Container]: ...

    async def logs(self, name: str, tail: int) -> bytes | None:
        """The last ``tail`` lines of container ``name``'s output, ``None`` if unknown."""
        ...

    async def stop(self) -> None: ...


def _child_env(env: Mapping[str, str], work_dir: Path) -> dict[str, str]:
    base = {"PATH": os.defpath + ":/usr/local/bin:/usr/local/sbin", "HOME": str(work_dir)}
    base.update(env)
    return base


async def _run_script(
    script: str, env: Mapping[str, str], cwd: Path, what: str, timeout: float
) -> None:
    log_path = cwd / f"{what}.log"
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            cwd=cwd,
            env=_child_env(env, cwd),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise RunnerError(
                f"{what} did not finish within {timeout:.0f}s (see {log_path})"
            ) from None
    if code != 0:
        raise RunnerError(f"{what} exited with status {code} (see {log_path})")


async def run_measured_scripts(
    compose: AppCompose, env: Mapping[str, str], work_dir: Path, timeout: float
) -> None:
    """``init_script`` (each, in order) then ``pre_launch_script``: both are part of
    app-compose, hence measured. A non-zero exit fails the boot."""
    for i, script in enumerate(compose.init_scripts):
        await _run_script(script, env, work_dir, f"init-script-{i}", timeout)
    if compose.pre_launch_script:
        await _run_script(compose.pre_launch_script, env, work_dir, "pre-launch", timeout)


class LocalProcessRunner:
    """Runs ``bash_script`` as a local child process (runner ``bash``)."""

    def __init__(self, *, pre_launch_timeout: float = 600.0) -> None:
        self._timeout = pre_launch_timeout
        self._pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._name = ""
        self._log: Path | None = None

    async def pre_launch(self, compose: AppCompose, env: Mapping[str, str], work_dir: Path) -> None:
        await run_measured_scripts(compose, env, work_dir, self._timeout)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    async def start(self, compose: AppCompose, env: Mapping[str, str], work_dir: Path) -> None:
        script = compose.bash_script
        if compose.runner != "bash" or not script:
            raise RunnerError(
                f"the local runner runs app-compose runner 'bash' with a bash_script; this app "
                f"uses runner {compose.runner!r} (use the docker runner)"
            )
        pid_file = work_dir / "app.pid"
        self._name = compose.name
        self._log = work_dir / "app.log"
        if pid_file.exists():
            with contextlib.suppress(ValueError):
                pid = int(pid_file.read_text())
                if self._alive(pid):
                    logger.info("app already running as pid %d; not starting it again", pid)
                    self._pid = pid
                    return
        with (work_dir / "app.log").open("ab") as log:
            # a plain Popen: the app outlives this event loop (and a retried boot's)
            proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=work_dir,
                env=_child_env(env, work_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        self._pid = proc.pid
        tmp = pid_file.with_suffix(".tmp")
        tmp.write_text(str(proc.pid))
        os.replace(tmp, pid_file)
        logger.info("app %s started as pid %d", compose.name, proc.pid)

    async def list(self) -> list[Container]:
        if self._pid is None:
            return []
        alive = self._alive(self._pid)
        return [
            Container(
                id=str(self._pid),
                names=(self._name,),
                image="local-process",
                state="running" if alive else "exited",
                status=f"pid {self._pid}",
            )
        ]

    async def logs(self, name: str, tail: int) -> bytes | None:
        if name != self._name or self._log is None:
            return None
        try:
            with self._log.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - MAX_LOG_BYTES))
                data = fh.read()
        except FileNotFoundError:
            return b""
        return b"".join(data.splitlines(keepends=True)[-tail:]) if tail > 0 else b""

    async def stop(self) -> None:
        """SIGTERM the app's process group (the PID we started), then reap it."""
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, signal.SIGTERM)
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self._proc.wait, 5)


class DockerComposeRunner:
    """``docker compose`` in the work dir (production)."""

    def __init__(self, *, docker: str = "docker", timeout: float = 1800.0) -> None:
        self._docker = docker
        self._timeout = timeout
        self._project: Path | None = None

    async def pre_launch(self, compose: AppCompose, env: Mapping[str, str], work_dir: Path) -> None:
        await run_measured_scripts(compose, env, work_dir, self._timeout)

    async def start(self, compose: AppCompose, env: Mapping[str, str], work_dir: Path) -> None:
        if compose.runner not in ("docker-compose", "nerdctl-compose"):
            raise RunnerError(f"the docker runner cannot run runner {compose.runner!r}")
        if not compose.docker_compose_file:
            raise RunnerError("app-compose.json has no docker_compose_file")
        self._project = work_dir
        tool = "nerdctl" if compose.runner == "nerdctl-compose" else self._docker
        script = f"{tool} compose -f docker-compose.yaml up --remove-orphans -d --build"
        await _run_script(script, env, work_dir, "compose-up", self._timeout)

    async def list(self) -> list[Container]:
        proc = await asyncio.create_subprocess_exec(
            self._docker,
            "ps",
            "-a",
            "--format",
            "{{.ID}}\t{{.Names}}\t{{.Image}}\t{{.State}}\t{{.Status}}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        rows = []
        for line in out.decode(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 5:
                rows.append(
                    Container(parts[0], tuple(parts[1].split(",")), parts[2], parts[3], parts[4])
                )
        return rows

    async def logs(self, name: str, tail: int) -> bytes | None:
        if not all(c.isalnum() or c in "-_." for c in name) or not name:
            return None
        proc = await asyncio.create_subprocess_exec(
            self._docker,
            "logs",
            "--tail",
            str(tail),
            name,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return out[-MAX_LOG_BYTES:] if proc.returncode == 0 else None

    async def stop(self) -> None:
        return None
