"""The roof the benchmarks are read against: this machine's fp32 and bf16 matmul rate on the threads a run uses.

    python bench/roofline.py [--threads 2] [--sizes 512,1024,2048] [--seconds 1.0]

A dense square matmul of size n costs 2 n^3 FLOPs; each size is timed for about `--seconds`, after one
untimed call, and a precision's rate is its best size's. On a CPU the threads default to torch's (one
per core here); on a GPU the sizes default to 4096 and 8192 and fp32 keeps torch's default (no TF32).
The other benchmarks call `measure` in their own run and report their achieved FLOP/s as a fraction
of the rate of the precision they trained in, and every table names the CPU and its bf16 ISA: AMX, AVX-512 BF16
or neither (bf16 is then emulated, and its rate says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dtrain.core import hardware  # noqa: E402

CPU_SIZES = (512, 1024, 2048)
GPU_SIZES = (4096, 8192)


def matmul_flops(n: int) -> float:
    """FLOPs of an n x n by n x n matmul: n^2 outputs, each n multiplies and n adds."""
    return 2.0 * n ** 3


def bf16_isa(flags: frozenset[str]) -> str:
    """How this CPU computes bf16: AMX tiles, AVX-512 BF16 dot products, or neither (emulated)."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return "neither"


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux), or 'CPU' where it cannot tell."""
    try:
        with open(cpuinfo) as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "CPU")
    except OSError:
        return "CPU"


def cpu_device(threads: int) -> str:
    """How every table names the CPU it ran on: "AMD EPYC (AVX-512 BF16), 2 threads"."""
    return f"{cpu_name()} ({bf16_isa(hardware.cpu_flags())}), {threads} threads"


def fraction(achieved_flops_per_s: float, roof_flops_per_s: float) -> float:
    return achieved_flops_per_s / roof_flops_per_s


@dataclasses.dataclass
class Roof:
    device: str  # "AMD EPYC (AVX-512 BF16), 2 threads" or the GPU's name
    gflops: dict[str, float]  # precision -> GFLOP/s, the best size's
    sizes: tuple[int, ...]

    def of(self, precision: str) -> float:
        """FLOP/s of a precision's roof."""
        return self.gflops[precision] * 1e9

    def describe(self) -> str:
        rates = ", ".join(f"{p} {g:,.0f} GFLOP/s" for p, g in self.gflops.items())
        return f"{self.device}: matmul {rates} (n = {', '.join(map(str, self.sizes))}, the best)"


def rate(n: int, dtype, device: str, seconds: float) -> float:
    """GFLOP/s of repeated n x n matmuls for about `seconds` (one untimed call first)."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
        torch.mm(a, b)
        sync()
        calls += 1
    return matmul_flops(n) * calls / elapsed / 1e9


def measure(threads: int | None = None, sizes: tuple[int, ...] | None = None, seconds: float = 1.0) -> Roof:
    """This machine's roof: on CUDA's first GPU if there is one, else on the CPU with `threads` threads."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if threads:
            torch.set_num_threads(threads)
        name = cpu_device(torch.get_num_threads())
    else:
        name = torch.cuda.get_device_name(0)
    sizes = sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)
    gflops = {precision: max(rate(n, dtype, device, seconds) for n in sizes)
              for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return Roof(name, gflops, tuple(sizes))


def measure_apart(seconds: float = 1.0) -> Roof:
    """`measure` in a process of its own, for a benchmark that does not import torch (nor hold a GPU's memory)."""
    out = subprocess.run([sys.executable, __file__, "--json", "--seconds", str(seconds)], capture_output=True,
                         text=True, check=True)
    fields = json.loads(out.stdout)
    return Roof(fields["device"], fields["gflops"], tuple(fields["sizes"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--sizes", default=None, help="comma-separated matmul sizes")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per size and precision")
    parser.add_argument("--json", action="store_true", help="print the roof as JSON")
    args = parser.parse_args()
    sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else None
    roof = measure(args.threads, sizes, args.seconds)
    print(json.dumps(dataclasses.asdict(roof)) if args.json else roof.describe())


if __name__ == "__main__":
    main()
