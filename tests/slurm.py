"""A real one-node SLURM on 127.0.0.1 for the integration tests: munged, slurmctld and slurmd.

Everything lives in a private folder (config, keys, sockets, state, logs), every daemon binds
to loopback on free ports, and :meth:`LocalSlurm.stop` ends exactly the processes it started,
by PID. Debian's ``slurm-wlm`` and ``munge`` are installed with apt when missing and we are root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.debian import apt_install

PACKAGES = ("slurm-wlm", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def missing_commands() -> list[str]:
    return [name for name in COMMANDS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def ensure_installed() -> str | None:
    """Install SLURM and MUNGE with apt when missing; return why they cannot be had, or None."""
    if not missing_commands():
        return None
    problem = apt_install(PACKAGES)
    if problem:
        return f"SLURM is not installed ({', '.join(missing_commands())} missing): {problem}"
    return f"still missing after apt-get: {missing_commands()}" if missing_commands() else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """A one-node cluster: ``cpus`` cores, ``memory_mb`` memory and ``gpus`` counted ``gpu`` GRES.

    Use as a context manager; while it runs, ``SLURM_CONF`` in this process points at its config,
    so ``sbatch``/``squeue``/``scancel`` (and dask-jobqueue) talk to it.
    """

    def __init__(self, folder: Path, cpus: int = 2, memory_mb: int = 6000, gpus: int = 1):
        self.folder = Path(folder)
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.node = socket.gethostname().split(".")[0]
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = self.folder / "slurm.conf"
        self._previous_conf = None

    # -- start and stop

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        folder = self.folder
        for name in ("munge", "state", "spool", "log"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        os.chmod(folder / "munge", 0o700)
        key = folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.munge_socket = folder / "munge" / "munge.socket"
        self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={folder / 'munge/munged.pid'}",
                               f"--seed-file={folder / 'munge/munged.seed'}",
                               f"--log-file={folder / 'log/munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), "munged socket", "munged")
        self._write_config()
        self._previous_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self._command(["sinfo", "-h"]).returncode == 0, "slurmctld", "slurmctld")
        self._spawn("slurmd", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(lambda: self.node_state().startswith("idle"), "the node to be idle", "slurmd")

    def stop(self) -> None:
        """End the daemons this object started (slurmd, slurmctld, munged), by PID."""
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._previous_conf

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "ab")  # noqa: SIM115 (closed with the process)
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=os.environ.copy())
        log.close()

    def _wait_for(self, condition, what: str, daemon: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[daemon].poll() is not None:
                raise RuntimeError(f"{daemon} exited with {self.processes[daemon].returncode} while waiting for "
                                   f"{what}:\n{self.log_tail()}")
            if condition():
                return
            time.sleep(0.3)
        raise TimeoutError(f"no {what} after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            text = path.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {path.name}\n{text[-characters:]}")
        return "\n".join(parts)

    def _write_config(self) -> None:
        folder, node = self.folder, self.node
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(f"""\
ClusterName=relcohort-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'log/slurmctld.log'}
SlurmdLogFile={folder / 'log/slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}{gres} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        (folder / "gres.conf").write_text(
            "AutoDetect=off\n" + (f"NodeName={node} Name=gpu File=/dev/null\n" if self.gpus else ""))
        (folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")

    # -- queries

    def _command(self, command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=30,
                              env={**os.environ, "SLURM_CONF": str(self.conf)})

    def node_state(self) -> str:
        result = self._command(["sinfo", "-h", "-N", "-o", "%T"])
        return result.stdout.strip() if result.returncode == 0 else ""

    def jobs(self) -> dict[str, tuple[str, str]]:
        """Live jobs: job ID → (name, state)."""
        result = self._command(["squeue", "-h", "-o", "%i|%j|%T"])
        return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in result.stdout.split()}

    def cancel(self, job_id: str) -> None:
        result = self._command(["scancel", str(job_id)])
        if result.returncode != 0:
            raise RuntimeError(f"scancel {job_id}: {result.stderr}")
