"""A real single-node Slurm for the tests: munged, slurmctld and slurmd on this host.

``slurm_cluster`` (session fixture; import it into a test module) starts private daemons:
their own munge socket and key, slurm.conf, ports, state and spool folders, all under
``<tmp>/gradsweep-slurm-<uid>/``, so a Slurm or munge already on the machine is neither used
nor disturbed. Accounting is off (no slurmdbd), as on the clusters the launcher must
support: ``sacct`` fails there. ``SLURM_CONF`` points at the private config while the
fixture lives, so every ``sbatch``/``squeue`` of the tests and of their subprocesses talks
to this cluster; at teardown every job is cancelled and the daemons are stopped.

Missing Slurm: with ``CI`` set (or ``GRADSWEEP_INSTALL_SLURM=1``) the fixture installs
Debian's ``slurm-wlm`` and ``munge`` with apt-get. It skips only outside CI; in CI anything
that keeps the cluster from starting is a test failure, with the daemons' logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PARTITION = "gradsweep"
PORTS = (16817, 16818)  # slurmctld, slurmd: not Slurm's defaults (6817/6818)
NEEDED = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
START_TIMEOUT_S = 30.0


@dataclass
class SlurmCluster:
    partition: str
    conf: Path  # slurm.conf (SLURM_CONF is set to it while the fixture lives)
    root: Path  # state, spool, logs and munge socket of this cluster
    node: str

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}")
        return res

    def job_field(self, job_id: str, key: str) -> str | None:
        """``scontrol show job`` field, e.g. Restarts or JobState (None once purged)."""
        res = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for tok in res.stdout.split():
            k, _, v = tok.partition("=")
            if k == key:
                return v
        return None

    def logs(self) -> str:
        return _logs(self.root)


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def _missing() -> list[str]:
    return [n for n in (*NEEDED, "munged") if _which(n) is None]


def _give_up(reason: str) -> None:
    """Skip on a developer machine; in CI a Slurm test that cannot run is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"Slurm test cluster: {reason}", pytrace=False)
    pytest.skip(f"Slurm test cluster: {reason}")


def _install() -> str:
    """apt-get install slurm-wlm munge; returns the tail of apt's output."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = ""
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)}: {e}"
        out = (res.stdout + res.stderr)[-2000:]
        if res.returncode != 0:
            return f"{' '.join(cmd)} exited {res.returncode}:\n{out}"
    return out


def _ensure_installed() -> None:
    missing = _missing()
    if not missing:
        return
    wants_install = bool(os.environ.get("CI")) or os.environ.get("GRADSWEEP_INSTALL_SLURM") == "1"
    if not wants_install:
        _give_up(
            f"not installed (missing {', '.join(missing)}); install Debian's slurm-wlm and "
            "munge, or set GRADSWEEP_INSTALL_SLURM=1 to let the tests apt-get them"
        )
    if os.geteuid() != 0 or _which("apt-get") is None:
        _give_up(f"missing {', '.join(missing)} and cannot apt-get them (needs root and apt)")
    log = _install()
    missing = _missing()
    if missing:
        _give_up(f"still missing {', '.join(missing)} after apt-get install:\n{log}")


def _base_dir() -> Path:
    base = Path(tempfile.gettempdir()) / f"gradsweep-slurm-{os.getuid()}"
    if len(str(base)) > 60:  # the munge socket path must fit a sockaddr_un (108 bytes)
        base = Path("/tmp") / f"gradsweep-slurm-{os.getuid()}"
    return base


def _stop_pid(pid: int, marker: str, wait_s: float = 10.0) -> None:
    """Stop one daemon this fixture started (its command line names our folder)."""
    if not _is_ours(pid, marker):
        return  # already gone, or the pid was reused by something else
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:  # reap it when it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        if not _is_ours(pid, marker):  # exited (a zombie's cmdline is empty)
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_stale(base: Path) -> None:
    """Daemons left by an earlier session of this fixture (crashed, killed): by their pids."""
    pids_file = base / "pids"
    if not pids_file.exists():
        return
    pids = [int(w) for w in pids_file.read_text().split() if w.isdigit()]
    conf = base / "slurm.conf"
    if conf.exists() and any(_is_ours(pid, str(base)) for pid in pids):
        # its jobs first, while its slurmd can still end them (else slurmstepd lingers)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        try:
            subprocess.run(
                ["scancel", "--partition", PARTITION], env=env, capture_output=True, timeout=30
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                q = subprocess.run(
                    ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, timeout=30
                )
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for pid in reversed(pids):  # slurmd, slurmctld, munged
        _stop_pid(pid, str(base))
    pids_file.unlink()


def _is_ours(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def _port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port")


def _node_line(node: str) -> str:
    """This host as Slurm sees it (``slurmd -C``), with memory to spare for the OS."""
    res = subprocess.run(
        [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=60
    )
    fields = dict(
        tok.split("=", 1) for tok in res.stdout.split() if "=" in tok and res.returncode == 0
    )
    cpus = fields.get("CPUs") or str(len(os.sched_getaffinity(0)))
    mem_mb = int(fields.get("RealMemory") or os.sysconf("SC_PHYS_PAGES") * 4096 // 2**20)
    line = f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus}"
    for key in ("Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"):
        if key in fields:
            line += f" {key}={fields[key]}"
    return line + f" RealMemory={max(512, int(mem_mb * 0.8))} State=UNKNOWN"


def _write_conf(root: Path, node: str, ctld_port: int, slurmd_port: int) -> Path:
    conf = root / "slurm.conf"
    conf.write_text(
        f"""# written by tests/slurm_cluster.py: a private single-node cluster, no accounting
ClusterName=gradsweep
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged; cred_expire also sets how long a requeued job waits (default 120 s)
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
KillWait=2
MinJobAge=60
# small, so that a test grid goes out as several arrays as a large one does on a cluster
MaxArraySize=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
{_node_line(node)}
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _logs(root: Path, n: int = 40) -> str:
    parts = []
    for f in sorted((root / "log").glob("*")):
        lines = f.read_text(errors="replace").splitlines()[-n:]
        parts.append(f"--- {f} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def _node_state(env: dict[str, str]) -> str:
    try:
        res = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"],
            capture_output=True,
            text=True,
            env=env,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return "(sinfo timed out)"
    return res.stdout.strip() if res.returncode == 0 else f"(sinfo: {res.stderr.strip()})"


def _start(base: Path) -> tuple[SlurmCluster, list[subprocess.Popen[bytes]]]:
    if base.exists():
        shutil.rmtree(base)
    root = base
    for sub in ("state", "spool", "run", "log", "munge"):
        (root / sub).mkdir(parents=True)
    (root / "munge").chmod(0o755)  # munged wants its socket folder world-searchable
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = socket.gethostname().split(".")[0]
    conf = _write_conf(root, node, _port(PORTS[0]), _port(PORTS[1]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str) -> None:
        log = open(root / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the daemon owns it)
        p = subprocess.Popen(
            [_which(name) or name, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # not in the tests' process group (no stray Ctrl-C)
        )
        procs.append(p)
        with open(base / "pids", "a") as f:
            f.write(f"{p.pid}\n")

    m = root / "munge"
    spawn(
        "munged",
        "-F",
        "-f",
        f"--socket={m / 'munge.socket.2'}",
        f"--key-file={key}",
        f"--pid-file={m / 'munged.pid'}",
        f"--seed-file={m / 'munged.seed'}",
        f"--log-file={root / 'log' / 'munged.log'}",
    )
    deadline = time.monotonic() + 10
    while not (m / "munge.socket.2").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    spawn("slurmctld", "-D", "-f", str(conf))
    spawn("slurmd", "-D", "-f", str(conf))
    cluster = SlurmCluster(PARTITION, conf, root, node)
    deadline, state = time.monotonic() + START_TIMEOUT_S, ""
    while time.monotonic() < deadline:
        state = _node_state(env)
        if state in ("idle", "mixed", "allocated"):
            return cluster, procs
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            break
        time.sleep(0.5)
    exits = ", ".join(f"{p.args[0]} exit {p.returncode}" for p in procs if p.poll() is not None)
    for p in reversed(procs):
        _stop_pid(p.pid, str(base))
    pytest.fail(
        f"Slurm test cluster did not come up within {START_TIMEOUT_S:.0f} s "
        f"(node state: {state or '?'}; {exits or 'daemons still running'}).\n"
        f"slurm.conf: {conf}\n{_logs(root)}",
        pytrace=False,
    )
    raise AssertionError  # unreachable: pytest.fail raises


def _teardown(cluster: SlurmCluster, procs: list[subprocess.Popen[bytes]], base: Path) -> None:
    cluster.run("scancel", "--partition", cluster.partition, check=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        res = cluster.run("squeue", "-h", "-o", "%i", check=False)
        if res.returncode != 0 or not res.stdout.strip():
            break
        time.sleep(0.5)
    for p in reversed(procs):  # slurmd, slurmctld, then munged
        _stop_pid(p.pid, str(base))
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    (base / "pids").unlink(missing_ok=True)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A running single-node Slurm (fresh daemons each session); SLURM_CONF set for it."""
    _ensure_installed()
    if os.geteuid() != 0:
        _give_up("needs root (slurmd launches the jobs as their owner)")
    base = _base_dir()
    base.mkdir(parents=True, exist_ok=True)
    _stop_stale(base)
    cluster, procs = _start(base)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        try:
            _teardown(cluster, procs, base)
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
