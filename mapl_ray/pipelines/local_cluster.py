"""A multi-node Ray cluster on one machine: ``ray start --head`` plus ``ray start --address`` nodes, each a
``ray start --block`` process whose children are that node's Ray processes.

It runs the cluster commands of docs/cluster.md (``ray job submit``, ``ray job logs``, ``serve deploy``)
without a cloud, and is what the tests and ``bench/cluster.py`` start. Each node is stopped through its
own process, by PID (never ``ray stop``, which would stop every Ray instance on the machine); a node can
also be lost on purpose (:meth:`LocalCluster.kill_raylet`, :meth:`LocalCluster.kill_node`). The cluster
uses its own temporary folder and authentication token (``RAY_AUTH_TOKEN``), so other Ray instances on
the machine are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port nobody listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One node: its ``ray start --block`` process, its raylet's port, and every process seen under it
    (``psutil.Process`` objects, which refuse to signal a PID that was reused since)."""

    name: str
    proc: subprocess.Popen
    node_manager_port: int
    resources: dict[str, float]
    procs: dict[int, Any] = field(default_factory=dict)


class LocalCluster:
    """A Ray cluster of several nodes on 127.0.0.1 (a context manager: stopped on exit).

    Args:
        head_cpus: CPUs the head node offers (the job drivers run there).
        root: folder for Ray's session files and the nodes' output (default: a new temporary folder).
        env: more environment variables for every node and command (e.g. ``PYTHONPATH``).
    """

    def __init__(self, head_cpus: int = 1, root: str | None = None, env: dict[str, str] | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="mapl-rc-"))  # short: Ray's socket paths have a limit
        self.root.mkdir(parents=True, exist_ok=True)
        self.head_cpus = head_cpus
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            # `python` in a job's entrypoint is this environment's, as on a cluster with the package installed
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[Node] = []
        self._ray = str(Path(sys.executable).with_name("ray"))

    @property
    def address(self) -> str:
        """The GCS address (``ray start --address``, ``ray.init(address=...)``)."""
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and job API (``ray job submit --address``)."""
        return f"http://{HOST}:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], cpus: int, resources: dict[str, float]) -> Node:
        port = free_port()
        cmd = [self._ray, "start", "--block", f"--node-ip-address={HOST}", f"--num-cpus={cpus}", "--num-gpus=0"]
        cmd += [f"--node-manager-port={port}", f"--resources={json.dumps(resources)}", *args]
        out = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, port, resources)
        self.nodes.append(node)
        self._record_pids()
        return node

    def start(self, timeout_s: float = 120) -> LocalCluster:
        """Start the head node (GCS, dashboard with the job API) and wait for the dashboard."""
        args = ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.root / 'ray'}", "--include-dashboard=true"]
        args += [f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}"]
        args += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        self.wait_for(self._start("head", args, self.head_cpus, {}), timeout_s)
        return self

    def add_node(self, name: str, cpus: int, resources: dict[str, float], timeout_s: float = 120) -> Node:
        """Start a worker node with its own (e.g. custom) resources and wait until the cluster counts it."""
        args = [f"--address={self.address}", f"--dashboard-agent-listen-port={free_port()}"]
        node = self._start(name, args, cpus, resources)
        self.wait_for(node, timeout_s)
        return node

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as the dashboard lists them ([] while it does not answer)."""
        try:
            with urllib.request.urlopen(self._request("/nodes?view=summary"), timeout=5) as r:
                summary = json.loads(r.read())["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return []
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def _request(self, path: str) -> urllib.request.Request:
        headers = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        return urllib.request.Request(self.dashboard_url + path, headers=headers)

    def node_id(self, node: Node) -> str | None:
        """Ray's ID of ``node`` while the cluster counts it alive, else None."""
        for n in self.alive_nodes():
            if n["raylet"].get("nodeManagerPort") == node.node_manager_port:
                return n["raylet"]["nodeId"]
        return None

    def wait_for(self, node: Node, timeout_s: float) -> None:
        """Wait until the cluster counts ``node`` alive. Raises TimeoutError with the node's last output."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self._record_pids()
            if self.node_id(node):
                return
            if node.proc.poll() is not None:
                break  # it has ended: its output says why
            time.sleep(1)
        out = (self.root / f"{node.name}.log").read_text()[-3000:]
        raise TimeoutError(f"Ray node {node.name} not alive after {timeout_s} s; its output ends: {out}")

    def _record_pids(self) -> None:
        import psutil

        for node in self.nodes:
            try:
                top = psutil.Process(node.proc.pid)
                for p in [top, *top.children(recursive=True)]:
                    node.procs.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def raylet_pid(self, node: Node) -> int:
        """The PID of ``node``'s raylet (found by its ``--node_manager_port``)."""
        import psutil

        for p in psutil.Process(node.proc.pid).children(recursive=True):
            cmd = " ".join(p.cmdline())
            if p.name() == "raylet" and f"--node_manager_port={node.node_manager_port}" in cmd:
                return p.pid
        raise LookupError(f"no raylet under node {node.name}")

    def kill_raylet(self, node: Node) -> None:
        """SIGKILL the node's raylet only (its workers and ``ray start --block`` notice and end)."""
        self._record_pids()
        os.kill(self.raylet_pid(node), signal.SIGKILL)

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of the node at once, as when a machine is lost."""
        import psutil

        self._record_pids()
        for p in node.procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def run(self, *args: str, timeout_s: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
        """A ``ray`` CLI command against this cluster (``ray job submit ...``), output captured."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard_url}
        return subprocess.run([self._ray, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)

    def stop(self, grace_s: float = 30) -> None:
        """Stop every node (workers first, then the head): SIGTERM to each ``ray start --block``, then
        SIGKILL to any process seen under a node that is still there, by PID."""
        import psutil

        self._record_pids()
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for node in reversed(self.nodes):
            try:
                node.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:
            for p in node.procs.values():
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        psutil.wait_procs([p for n in self.nodes for p in n.procs.values()], timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """PIDs of the processes seen under the nodes that still run (empty after :meth:`stop`)."""
        import psutil

        def running(p) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        return [pid for n in self.nodes for pid, p in n.procs.items() if running(p)]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _train_log(run: Path) -> list[dict]:
    path = run / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def submit_train_job(
    cluster: LocalCluster,
    args: list[str],
    run: Path,
    cwd: str,
    kill: str | None = None,
    kill_at_step: int = 0,
    replacement: tuple[int, dict[str, float]] | None = None,
    timeout_s: float = 900,
) -> dict[str, Any]:
    """``ray job submit --working-dir CWD -- python jobs/train.py ARGS`` on ``cluster``, waited for; with
    ``kill`` (``"raylet"`` or ``"node"``) the last node started is lost once ``train_log.jsonl`` reaches
    ``kill_at_step``, and a ``replacement`` node ``(cpus, resources)`` is started, as an autoscaler would.

    Returns:
        ``status`` (Ray's job status), ``job_wall_s`` (submission to the end), ``logs`` (the job's output) and,
        with ``kill``: ``killed_at_step``, ``steps_repeated`` (logged again after the restart),
        ``recovery_s`` (from the kill to the first step logged after the restart).
    """
    sid = f"mapl-{secrets.token_hex(4)}"
    t0 = time.monotonic()
    submit = ["job", "submit", "--no-wait", f"--submission-id={sid}", "--working-dir", "."]
    sub = cluster.run(*submit, "--", "python", "jobs/train.py", *args, cwd=cwd)
    if sub.returncode:
        raise RuntimeError(f"ray job submit failed: {sub.stderr[-2000:]}")
    out: dict[str, Any] = {}
    end = t0 + timeout_s
    while time.monotonic() < end:
        done = cluster.run("job", "status", sid)
        status = done.stdout + done.stderr  # Ray's CLI writes the status line to stderr
        # "Job 'ID' succeeded" (colours and case vary by Ray version)
        state = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if f"{sid}' {s.lower()}" in status.lower()), None)
        if state:
            break
        log = _train_log(run)
        if kill and "killed_at_step" not in out and log and log[-1].get("step", 0) >= kill_at_step:
            out["killed_at_step"], t_kill = log[-1]["step"], time.monotonic()
            victim = cluster.nodes[-1]
            cluster.kill_raylet(victim) if kill == "raylet" else cluster.kill_node(victim)
            if replacement:
                cluster.add_node(f"{victim.name}-replacement", *replacement)
        if "killed_at_step" in out and "recovery_s" not in out:
            marker = next((i for i, r in enumerate(log) if r.get("event") == "restart"), None)
            if marker is not None and len(log) > marker + 1:
                out["recovery_s"] = time.monotonic() - t_kill
                out["steps_repeated"] = log[marker]["steps_repeated"]
        time.sleep(0.5)
    else:
        state = "TIMEOUT"
    out.update(status=state, job_wall_s=time.monotonic() - t0, logs=cluster.run("job", "logs", sid).stdout)
    return out
