"""Two "machines" (network namespaces joined by a veth pair), one torchrun agent in each.

The agents meet through a c10d rendezvous on 10.77.0.1, an address that exists
only inside the namespaces; each worker's gloo traffic goes over the veth.
One node's worker is SIGKILLed mid-run: both nodes must restart their round
together, resume from the newest checkpoint and finish with the weights of
one process trained on the whole batch. Needs root and ``ip netns``.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid

import pytest
import torch
from test_distributed import REPLICA, assert_params_close, baseline, child_env  # noqa: F401 - the fixture

import torchslim as slim

ADDRESSES = ("10.77.0.1", "10.77.0.2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2; removed afterwards, always."""
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = uuid.uuid4().hex[:6]
    names = [f"tslim{tag}a", f"tslim{tag}b"]
    links = [f"ts{tag}a", f"ts{tag}b"]
    made: list[str] = []
    try:
        for ns in names:
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as e:
                pytest.skip(f"ip netns add refused: {e.stderr.strip()}")
            made.append(ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for ns, link, address in zip(names, links, ADDRESSES):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield list(zip(names, links, ADDRESSES))
    finally:
        for ns in made:  # whatever still runs in a namespace (a worker of a failed run) goes with it
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=20).stdout
            for pid in pids.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in made:  # deleting a namespace removes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", links[0]], capture_output=True, timeout=20)


@pytest.mark.slow
def test_both_nodes_resume_together_after_one_nodes_worker_is_killed(
    tmp_path, two_hosts, baseline, python_exe, subprocess_env  # noqa: F811 - the fixture imported above
):
    agents = []
    try:
        for ns, link, address in two_hosts:
            cmd = [
                "ip", "netns", "exec", ns, python_exe, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--max-restarts", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{ADDRESSES[0]}:29400", "--rdzv-id", "multinode", "--local-addr", address,
                # The first node hosts the rendezvous store (torchrun cannot tell by its hostname here).
                "--rdzv-conf", f"is_host={int(address == ADDRESSES[0])}",
                "--monitor-interval", "0.1", REPLICA, "--logdir", str(tmp_path / "log"), "--out", str(tmp_path / "out"),
                "--batch", "16", "--save-steps", "10", "--kill-rank", "1", "--kill-at-step", "25",
                "--kill-once-file", str(tmp_path / "killed"),
            ]
            agents.append(subprocess.Popen(
                cmd, env=child_env(subprocess_env, GLOO_SOCKET_IFNAME=link), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            ))
        logs = [agent.communicate(timeout=240)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.communicate()
    for agent, log in zip(agents, logs):
        assert agent.returncode == 0, log
    assert any("rank 1: killing myself before step 25" in log for log in logs), logs
    outs = [torch.load(str(tmp_path / f"out.rank{rank}.pt")) for rank in range(2)]
    # torchrun's restart counter is per node: 1 where the worker died; on the other node 0 when its agent saw
    # the new round first, 1 when its worker first failed on the dead peer (a loaded machine). The round met
    # either way: the restart's store keys come from the rendezvous, not from these counters.
    assert sorted(out["restarts"] for out in outs) in ([0, 1], [1, 1])
    for out in outs:
        assert (out["step"], out["world"]) == (50, 2)
        assert_params_close(out["params"], baseline["params"])  # resumed from step 20 on both nodes
    assert slim.checkpoint.checkpoint_step(slim.checkpoint.latest_checkpoint(str(tmp_path / "log"))) == 50
