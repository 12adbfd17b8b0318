"""The one-node SLURM cluster of ``tests/slurm/cluster.sh`` as a session fixture, and helpers
to read its queue. Tests that use it are marked ``slurm``; they skip with the script's reason
where the cluster cannot start (not root, no apt-get, a port in use), unless
``WSI_NUCLEI_REQUIRE_SLURM=1`` (set by ``.ci/run``) makes that a failure."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "slurm" / "cluster.sh"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Slurm:
    base: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def jobs(self, name: str | None = None) -> dict[str, str]:
        """{job id: state} of the jobs in the queue (named ``name``, when given)."""
        out = self.run("squeue", "-h", *(["-n", name] if name else []), "-o", "%i %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def state(self, job_id: str) -> str:
        """A job's state, also after it ended (SLURM keeps it for MinJobAge = 300 s)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else ""

    def wait_empty(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.jobs():
                return True
            time.sleep(0.2)
        return False

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)
        self.wait_empty()


@pytest.fixture(scope="session")
def slurm() -> Slurm:  # type: ignore[misc]
    required = os.environ.get("WSI_NUCLEI_REQUIRE_SLURM") == "1"
    base = Path(tempfile.mkdtemp(prefix="wsi-slurm-"))
    ctld, slurmd = _free_ports(2)
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start", str(base), str(ctld), str(slurmd)], capture_output=True, text=True,
                                 timeout=600)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SCRIPT), "stop", str(base)], capture_output=True, timeout=120)
        pytest.fail("tests/slurm/cluster.sh start took more than 10 minutes")
    lines = (started.stdout + started.stderr).strip().splitlines()
    if started.returncode == 3 and not required:
        pytest.skip(lines[-1] if lines else "SLURM cannot start here")
    if started.returncode != 0:
        pytest.fail("tests/slurm/cluster.sh start failed:\n" + "\n".join(lines[-40:]))
    env = {**os.environ, "SLURM_CONF": str(base / "etc" / "slurm.conf")}
    try:
        yield Slurm(base, env)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(base)], capture_output=True, timeout=120)
