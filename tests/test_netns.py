"""Two real hosts: horovodrun over ssh between two network namespaces.

`horovodrun -np 2 -H 10.213.0.1:1,10.213.0.2:1` must train across two machines. Here the two
machines are network namespaces joined by a veth pair (each end named `khl0`), each running its
own sshd on a throwaway host key. horovodrun runs inside the first namespace, so the rank on the
second host is started over ssh and reached only through the veth link: the run proves the ssh
launch (`--ssh-port`, `--ssh-identity-file`), the Gloo rendezvous over a real interface (`--network-interface khl0`),
and that config.json records world size 2, cross_size 2, local_size 1.

It skips, with its reason, unless it runs as root with iproute2 (`ip`), Debian's
openssh-server (`/usr/sbin/sshd`), the ssh client and Horovod, and `ip netns add` works (a
container may lack CAP_SYS_ADMIN). It leaves the user's ssh setup alone: keys, sshd configs and
the client config live in tmp_path, and an `ssh` wrapper first on PATH adds `-F` so that
horovodrun's ssh commands use that config (ssh reads ~/.ssh from the passwd entry, not $HOME).
Outside tmp_path it writes only /etc/netns/<namespace>/hosts (removed afterwards; `ip netns
exec` shows it as that namespace's /etc/hosts) and may leave the empty directory /run/sshd,
which sshd requires and Debian's ssh service creates anyway.

The hosts file maps this machine's hostname to the namespace's own veth address, as a real
cluster's DNS would. It is needed: Horovod 0.28.1 builds the Gloo device of its global process
set (GlooContext::InitializeForProcessSet) without the --network-interface it was given, so it
binds to whatever the hostname resolves to; with `127.0.0.1 <hostname>` (or Debian's default
`127.0.1.1 <hostname>`) each rank advertises a loopback address and hvd.init() aborts with
"gloo::IoException ... connect [127.0.0.1]:PORT: Connection refused".
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import (
    CHILD_ENV,
    horovodrun_command,
    main_command,
    requires_horovod,
    world_shape,
)

SSHD = "/usr/sbin/sshd"  # Debian's path; sshd must be started by its absolute path
SSH_PORT = 2222  # any port is free in a fresh namespace; not 22, so --ssh-port is exercised
NIC = "khl0"  # the veth end's name in both namespaces, for --network-interface
ADDRESSES = ("10.213.0.1", "10.213.0.2")
SETUP_TIMEOUT = 10
RUN_TIMEOUT = 600
ETC_NETNS = pathlib.Path("/etc/netns")  # `ip netns exec NS` mounts /etc/netns/NS/* over /etc


def _missing_prerequisite() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`) on PATH"
    if not os.path.exists(SSHD):
        return f"needs Debian's openssh-server ({SSHD})"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "needs the ssh client (`ssh`, `ssh-keygen`) on PATH"
    return None


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=SETUP_TIMEOUT)


def _check(*command: str) -> None:
    result = _run(*command)
    assert result.returncode == 0, f"`{shlex.join(command)}` failed: {result.stderr.strip()}"


def _in_netns(namespace: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *command]


def _add_namespace(namespace: str, address: str) -> None:
    """A network namespace whose /etc/hosts maps this machine's hostname to `address`."""
    result = _run("ip", "netns", "add", namespace)
    if result.returncode != 0:
        pytest.skip(f"`ip netns add` failed (no CAP_SYS_ADMIN?): {result.stderr.strip()}")
    (ETC_NETNS / namespace).mkdir(exist_ok=True)
    (ETC_NETNS / namespace / "hosts").write_text(
        f"127.0.0.1 localhost\n{address} {socket.gethostname()}\n"
    )


def _remove_namespace(namespace: str) -> None:
    """Kill every process left inside (sshd, sessions, stray ranks), then delete it."""
    pids = _run("ip", "netns", "pids", namespace).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", namespace)  # also removes the veth pair
    shutil.rmtree(ETC_NETNS / namespace, ignore_errors=True)


def _link(namespaces: tuple[str, str]) -> None:
    """A veth pair between the namespaces, `khl0` at both ends, addressed and up; `lo` up."""
    a, b = namespaces
    _check("ip", "link", "add", NIC, "netns", a, "type", "veth", "peer", "name", NIC, "netns", b)
    for namespace, address in zip(namespaces, ADDRESSES, strict=True):
        _check("ip", "-n", namespace, "address", "add", f"{address}/24", "dev", NIC)
        _check("ip", "-n", namespace, "link", "set", NIC, "up")
        _check("ip", "-n", namespace, "link", "set", "lo", "up")


def _stop(sshd: subprocess.Popen) -> None:
    sshd.kill()
    sshd.wait(timeout=SETUP_TIMEOUT)


def _write_keys(keys: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A throwaway host key and client key; the client key is the only authorized one."""
    keys.mkdir()
    host_key, client_key = keys / "ssh_host_ed25519_key", keys / "id_ed25519"
    for key in (host_key, client_key):
        _check("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "khl-netns", "-f", str(key))
    shutil.copy(client_key.with_name(client_key.name + ".pub"), keys / "authorized_keys")
    return host_key, client_key


def _start_sshd(namespace: str, address: str, host_key: pathlib.Path, work: pathlib.Path):
    """sshd in the foreground inside `namespace`, listening on `address`, logging to a file."""
    config = work / f"sshd-{address}.conf"
    config.write_text(
        f"ListenAddress {address}\n"
        f"Port {SSH_PORT}\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {host_key.parent / 'authorized_keys'}\n"
        f"PidFile {work / f'sshd-{address}.pid'}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "StrictModes no\n"
        "UsePAM no\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    with open(work / f"sshd-{address}.log", "w") as log:  # sshd keeps its own copy
        return subprocess.Popen(
            _in_netns(namespace, SSHD, "-D", "-e", "-f", str(config)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _ssh_wrapper(client_key: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    """A directory holding an `ssh` that uses a private client config; put it first on PATH."""
    config = work / "ssh_config"
    config.write_text(
        "Host *\n"
        f"  IdentityFile {client_key}\n"
        "  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  BatchMode yes\n"
        "  LogLevel ERROR\n"
    )
    bin_dir = work / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    real_ssh = shutil.which("ssh")
    wrapper.write_text(
        f'#!/bin/sh\nexec {shlex.quote(real_ssh)} -F {shlex.quote(str(config))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return bin_dir


def _wait_for_ssh(namespace: str, address: str, bin_dir: pathlib.Path, log: pathlib.Path):
    """Until `ssh address true` from `namespace` succeeds (sshd up, key accepted)."""
    command = _in_netns(namespace, str(bin_dir / "ssh"), "-p", str(SSH_PORT), address, "true")
    deadline = time.monotonic() + SETUP_TIMEOUT
    while True:
        result = _run(*command)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"ssh to {address} failed: {result.stderr}\nsshd log:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.fixture
def two_hosts(tmp_path):
    """Two namespaces linked by veth, sshd in each; yields (namespace A, client key, ssh dir)."""
    missing = _missing_prerequisite()
    if missing:
        pytest.skip(missing)
    namespaces = (f"khl-a-{os.getpid()}", f"khl-b-{os.getpid()}")
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, also on skip or failure
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir()
            cleanup.callback(ETC_NETNS.rmdir)
        for namespace, address in zip(namespaces, ADDRESSES, strict=True):
            _add_namespace(namespace, address)
            cleanup.callback(_remove_namespace, namespace)
        _link(namespaces)
        host_key, client_key = _write_keys(tmp_path / "keys")
        bin_dir = _ssh_wrapper(client_key, tmp_path)
        for namespace, address in zip(namespaces, ADDRESSES, strict=True):
            cleanup.callback(_stop, _start_sshd(namespace, address, host_key, tmp_path))
        for address in ADDRESSES:  # from A, as horovodrun will
            _wait_for_ssh(namespaces[0], address, bin_dir, tmp_path / f"sshd-{address}.log")
        yield namespaces[0], client_key, bin_dir


@pytest.mark.slow
@requires_horovod
def test_two_namespaces_over_ssh_give_cross_size_2(tmp_path, two_hosts):
    namespace, client_key, bin_dir = two_hosts
    run_dir = tmp_path / "run"
    ssh = ("--ssh-port", str(SSH_PORT), "--ssh-identity-file", str(client_key))
    launch = horovodrun_command(
        2,
        *main_command("--preset", "tiny", "--train.epochs=1", "--run-dir", str(run_dir)),
        hosts=",".join(f"{address}:1" for address in ADDRESSES),
        extra=("--network-interface", NIC, *ssh),
    )
    env = {**os.environ, **CHILD_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    # On a timeout, the fixture kills whatever is left in the namespaces.
    result = subprocess.run(
        _in_netns(namespace, *launch),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert world_shape(run_dir) == (2, 2, 1)
