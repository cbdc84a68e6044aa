"""What this machine offers, found without importing torch (the launch side must stay fast)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable


def visible_gpus(environ: dict[str, str] | None = None) -> int:
    """Number of CUDA devices a worker would see.

    CUDA_VISIBLE_DEVICES wins when set (as CUDA itself does); otherwise ask nvidia-smi.
    """
    found = os.environ if environ is None else environ
    visible = found.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return count_visible_devices(visible)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def min_compute_capability() -> float | None:
    """The lowest CUDA compute capability among this machine's GPUs (8.0 = Ampere, the first with
    bf16), from nvidia-smi; None when it cannot tell."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        values = [float(line) for line in out.stdout.split() if out.returncode == 0]
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return min(values, default=None)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux: the first processor's `flags` line); none where it cannot tell."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def count_visible_devices(value: str) -> int:
    """Count entries of a CUDA_VISIBLE_DEVICES value; CUDA stops at the first invalid one (-1)."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        count += 1
    return count


def cpu_count() -> int:
    """CPUs this process may run on (respects affinity masks set by SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def port_is_free(port: int, host: str = "") -> bool:
    """Whether a server could listen on `port`: like the rendezvous store, reuse the address, so
    connections of a finished job still in TIME_WAIT (a requeued SLURM job's port) do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port the OS just reported free; used for single-node rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def wait_to_resolve(host: str, timeout: float, resolve: Callable[[str], object] = socket.gethostbyname,
                    sleep: Callable[[float], None] = time.sleep, said: Callable[[], None] = lambda: None) -> bool:
    """Whether `host` resolves within `timeout` seconds: a pod's name resolves only once its pod exists, so the
    other nodes of a job wait for node 0's (calling `said` once, when the first try fails)."""
    deadline, first = time.monotonic() + timeout, True
    while True:
        try:
            resolve(host)
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
        if first:
            said()
            first = False
        sleep(1.0)


def is_local_address(host: str) -> bool:
    """True when `host` names this machine, so a rendezvous store would bind here."""
    if host in ("localhost", "127.0.0.1", "::1", "") or host.startswith("127."):
        return True
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    names = {socket.gethostname(), socket.getfqdn()}
    return address.startswith("127.") or host in names


def route_to(host: str) -> tuple[str, str] | None:
    """(this machine's address toward `host`, the interface that holds it), or None when `host` does not
    resolve or no interface holds that address. What a node of a multi-node job advertises, and the
    interface gloo and NCCL must use: the host name may resolve to 127.0.0.1 (as /etc/hosts has it on
    many Debian and Ubuntu machines), and a machine may have several interfaces. A UDP socket
    "connected" to `host` sends nothing; the kernel's route picks its source address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(host), 9))
            address = probe.getsockname()[0]
    except OSError:
        return None
    interface = next((name for _, name in socket.if_nameindex() if interface_address(name) == address), None)
    return (address, interface) if interface else None


def interface_address(name: str) -> str | None:
    """An interface's IPv4 address (Linux: the SIOCGIFADDR ioctl), or None."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


# Dense peak TFLOP/s per device: tensor cores for bf16/fp16, plain FP32 for fp32 (no TF32); vendors'
# data sheets, SXM parts unless the name says PCIe. The first row whose pattern is in the name wins.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("H800", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak for this device and precision, or None (unknown: no MFU)."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in device_name:
            return peaks.get(precision)
    return None


def answers(address: str, timeout: float = 3.0) -> bool:
    """Whether a host answers on the network: a TCP connection to its discard port is refused at once by
    a host that is there, and goes unanswered (or unreachable) when it is not."""
    try:
        with socket.create_connection((address, 9), timeout=timeout):
            return True
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
