"""Decode-step matrix-vector products on CPU: which kernel reads the weights at streaming bandwidth.

For each shape (out N, in K) and each candidate kernel, prints the best time of y = x @ W.T for one
token and the bandwidth it reaches (weight bytes / time), next to a plain streaming read of the same
bytes (`sum` over them) as the ceiling. Weights rotate through a pool larger than the L3 cache, as a
whole model's would. Nothing is asserted; the machine may be shared, so read ratios, not absolutes.

    python benchmarks/bench_gemv.py                    # LM head 151936x512 and the 3B decoder shapes
    python benchmarks/bench_gemv.py --threads 1 --shapes 151936x512 --compile
    python benchmarks/bench_gemv.py --set avx2         # the AVX2 loops on an AVX-512 machine
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qwenvl_cli.model import native
from qwenvl_cli.model.int4 import cpu_int4_layout, native_layout
from qwenvl_cli.model.quant import onednn_packs

SHAPES = {
    "151936x512": (151936, 512),  # LM head of the 228M checkpoint
    "151936x2048": (151936, 2048),  # LM head of the 3B
    "2048x11008": (2048, 11008),  # 3B down_proj
    "11008x2048": (11008, 2048),  # 3B gate_proj / up_proj
    "2048x2048": (2048, 2048),  # 3B q_proj / o_proj
}


def l3_bytes() -> int:
    """The last-level cache's size from sysfs (32 MiB on the Zen 4 box, 480 MiB on an AMX Xeon one)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


POOL_BYTES = max(256 << 20, 2 * l3_bytes())  # rotate through at least this many weight bytes


def best_time(fn, pool: int, repeat: int) -> float:
    """Seconds per call, best pass of `repeat` over the pool: the minimum, not the median, because on a
    shared machine the noise only ever adds time."""
    for i in range(pool):  # warm-up: touch every weight once, build any kernel
        fn(i)
    times = []
    for r in range(repeat):
        t = time.perf_counter()
        for i in range(pool):
            fn(i)
        times.append((time.perf_counter() - t) / pool)
    return min(times)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(1).clamp(min=1e-8) / 127  # (N,)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    return packed, torch.stack([scale, zeros], -1).transpose(0, 1).contiguous()  # (K/g, N, 2)


def candidates(n: int, k: int, count: int, do_compile: bool, group: int, kernels: native.Kernels | None):
    """(name, weight bytes per call, fn(i)) for each kernel; weights built lazily per kernel."""
    x32 = torch.randn(1, k)
    x16 = x32.bfloat16()
    base = [torch.randn(n, k) / k**0.5 for _ in range(count)]

    yield "stream read fp32 (sum)", 4 * n * k, base, lambda ws, i: ws[i].sum()
    yield "F.linear fp32 (MKL)", 4 * n * k, base, lambda ws, i: F.linear(x32, ws[i])
    yield "torch.mv fp32", 4 * n * k, base, lambda ws, i: torch.mv(ws[i], x32[0])
    yield "mkl packed fp32", 4 * n * k, [
        torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in base
    ], lambda ws, i, origin=base: torch.ops.mkl._mkl_linear(x32, ws[i], origin[i], None, 1)
    if kernels is not None:
        yield "native fp32", 4 * n * k, base, lambda ws, i: kernels.gemv(ws[i], x32[0], None)
    yield "oneDNN prepacked fp32", 4 * n * k, [
        torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in base
    ], lambda ws, i: torch.ops.mkldnn._linear_pointwise(x32, ws[i], None, "none", [], "")
    bf = [w.bfloat16() for w in base]
    del base
    yield "stream read bf16 bytes", 2 * n * k, [w.view(n, k // 2, 2).view(torch.float32) for w in bf], \
        lambda ws, i: ws[i].sum()
    yield "F.linear bf16", 2 * n * k, bf, lambda ws, i: F.linear(x16, ws[i])
    yield "F.linear bf16 w, fp32 x (cast)", 2 * n * k, bf, lambda ws, i: F.linear(x32.bfloat16(), ws[i]).float()
    if onednn_packs(torch.bfloat16):  # not on AVX2 CPUs
        yield "oneDNN prepacked bf16", 2 * n * k, [
            torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in bf
        ], lambda ws, i: torch.ops.mkldnn._linear_pointwise(x16, ws[i], None, "none", [], "")
    if kernels is not None:
        yield "native bf16", 2 * n * k, bf, lambda ws, i: kernels.gemv(ws[i], x16[0], None)
    halves = [(w[: n // 2], w[n // 2 :]) for w in bf]

    def split(ws, i):
        fut = torch.jit.fork(F.linear, x16, ws[i][0])
        b = F.linear(x16, ws[i][1])
        return torch.cat([torch.jit.wait(fut), b], -1)

    yield "F.linear bf16, 2 halves (fork)", 2 * n * k, halves, split
    del halves
    if do_compile:
        def gemv(x, w):
            return (w.float() * x).sum(-1)

        compiled = torch.compile(gemv, dynamic=False)
        t = time.perf_counter()
        compiled(x32, bf[0])
        print(f"    (torch.compile of the bf16 GEMV took {time.perf_counter() - t:.1f} s)")
        yield "inductor bf16 GEMV", 2 * n * k, bf, lambda ws, i: compiled(x32, ws[i])
    q8 = [quantize_int8(w.float()) for w in bf]
    yield "int8 _weight_int8pack_mm fp32 x", n * k + 4 * n, q8, \
        lambda ws, i: torch.ops.aten._weight_int8pack_mm(x32, ws[i][0], ws[i][1])
    q8b = [(q, s.bfloat16()) for q, s in q8]
    yield "int8 _weight_int8pack_mm bf16 x", n * k + 2 * n, q8b, \
        lambda ws, i: torch.ops.aten._weight_int8pack_mm(x16, ws[i][0], ws[i][1])
    if kernels is not None:
        yield "native int8 fp32 x", n * k + 2 * n, q8b, lambda ws, i: kernels.gemv_int8(ws[i][0], ws[i][1], x32[0], None)
    del q8, q8b
    q4 = [quantize_int4(w.float(), group) for w in bf]
    del bf
    yield f"int4 _weight_int4pack_mm g{group} fp32 x", n * k // 2 + 8 * n * k // group, q4, \
        lambda ws, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x32, ws[i][0], group, ws[i][1])
    q4b = [(p, sz.bfloat16()) for p, sz in q4]
    yield f"int4 _weight_int4pack_mm g{group} bf16 x", n * k // 2 + 4 * n * k // group, q4b, \
        lambda ws, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, ws[i][0], group, ws[i][1])
    if kernels is not None and native_layout(kernels) == cpu_int4_layout():
        yield f"native int4 g{group} fp32 x", n * k // 2 + 4 * n * k // group, q4b, \
            lambda ws, i: kernels.gemv_int4(ws[i][0], ws[i][1], x32[0], None, group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["151936x512", "2048x11008", "11008x2048", "2048x2048"],
                    choices=sorted(SHAPES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--group", type=int, default=128, help="int4 group size along K")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile (inductor) GEMV")
    ap.add_argument("--set", choices=sorted(native.SETS), help="the native loops of this instruction set "
                    "(default: the best this CPU runs)")
    args = ap.parse_args()
    kernels = native.load(args.set) if args.set else native.kernels()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; weights rotate through {POOL_BYTES >> 20} MiB; "
          f"{kernels.describe() if kernels else native.status().reason}")
    with torch.inference_mode():
        for shape in args.shapes:
            n, k = SHAPES[shape]
            count = max(1, -(-POOL_BYTES // (4 * n * k)))  # fp32 copies in the pool
            print(f"\n{shape} (out x in), pool of {count}: {'kernel':36s} {'ms':>8s} {'GB/s':>7s} {'vs read':>8s}")
            ceiling = {}
            for name, nbytes, weights, fn in candidates(n, k, count, args.compile, args.group, kernels):
                seconds = best_time(lambda i: fn(weights, i), len(weights), args.repeat)
                gbs = nbytes / seconds / 1e9
                if name.startswith("stream read"):
                    ceiling[4 if "fp32" in name else 2] = gbs
                ref = ceiling.get(4) if "fp32" in name and "int" not in name else ceiling.get(2, ceiling.get(4))
                print(f"  {name:51s} {seconds * 1e3:8.3f} {gbs:7.1f} {gbs / ref:7.0%}")


if __name__ == "__main__":
    main()
