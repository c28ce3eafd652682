"""The native kernels (gemv.c: the decode step's matrix-vector products; attention.c: its one-query
attention; norm.c: RMSNorm; step.c: the decode step's small ops; vision.c: the vision attention's rotary
gather and scatter), with inner loops
for AVX-512 (avx512.c) and for AVX2 (avx2.c): built on first use with the system C compiler into a per-user
cache, loaded with ctypes after torch (so their OpenMP threads are torch's), checked against torch on small
products before use. Anything missing (not x86-64 Linux with AVX2 and FMA, no compiler, a failed build or
check, QWENVL_NATIVE=0) leaves `kernels()` None, with the reason in `status()`, and torch's kernels serve.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.[ch]")))  # compiled together into one library
ABI = 5  # qv_abi() of the sources above; a library answering otherwise is rebuilt
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11")
LIBS = ("-lm",)
# The instruction sets, best first: what each needs of the CPU for its float32, int8 and attention loops.
# bfloat16 on the AVX-512 set uses AVX512-BF16 where the CPU has it (else the AVX2 loop); int4 reads torch's
# pack for that set, with AVX512-VBMI and AVX512-VNNI on the AVX-512 one.
SETS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "fma"}, "avx2": {"avx2", "fma"}}
SET_NAMES = {"avx512": "AVX-512", "avx2": "AVX2"}
_P, _I = ctypes.c_void_p, ctypes.c_int64
_F = ctypes.c_float


class StepState(ctypes.Structure):
    """common.h's qv_step: what the bound calls of a decode step read that changes from step to step."""

    _fields_ = [("index", _I), ("cos", _P), ("sin", _P)]


@dataclass(frozen=True)
class Status:
    kernels: Kernels | None
    reason: str  # a phrase for --verbose: what serves the decode products and why
    broken: bool = False  # the CPU can run them but the build, the load or the check failed


class Kernels:
    """Typed calls into the library. Every tensor is a contiguous CPU tensor; shapes in the comments."""

    def __init__(self, lib: ctypes.CDLL, isa: str, flags: set[str]) -> None:
        """The loops of instruction set `isa` (a key of SETS) for a CPU with `flags`."""
        self.isa = isa
        self.bf16_set = bf16_set = "avx512" if isa == "avx512" and "avx512_bf16" in flags else "avx2"
        int4 = isa == "avx2" or {"avx512vbmi", "avx512_vnni"} <= flags
        # rows per block of the int4 pack the kernel reads: torch's for this set (model/int4.py), or None
        self.int4_rows = (64 if isa == "avx512" else 32) if int4 else None
        self._f32 = getattr(lib, f"qv_gemv_f32_{isa}")
        self._bf16 = getattr(lib, f"qv_gemv_bf16_{bf16_set}")
        self._int8 = getattr(lib, f"qv_gemv_int8_{isa}")
        self._int4 = getattr(lib, f"qv_gemv_int4_{isa}")
        # bfloat16 weights under float32 activations (a float32 model on a bfloat16 checkpoint): AVX2's loop
        self._bf16w = lib.qv_gemv_bf16w_f32_avx2
        for fn, args, restype in ((self._f32, 6, None), (self._bf16, 6, _I), (self._bf16w, 6, _I), (self._int8, 7, _I)):
            fn.argtypes = [_P] * (args - 2) + [_I, _I]
            fn.restype = restype  # _I: 0 when out of memory
        # the int8 loops' activations: float32 (AVX-512), or int16 in groups of this many (AVX2; gemv.c)
        self.int8_group = 128 if isa == "avx2" else None
        self._int4.argtypes = [_P] * 5 + [_I, _I, _I]
        self._int4.restype = _I
        self._rope = lib.qv_rope_gather
        self._rope.argtypes = [_P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _P]
        self._rope.restype = None
        self._scatter = lib.qv_scatter_rows
        self._scatter.argtypes = [_P, _I, _I, _I, _I, _I, _I, _I, _P, _I, _P]
        self._scatter.restype = None
        self._attention = {torch.float32: getattr(lib, f"qv_decode_attention_f32_{isa}"),
                           torch.bfloat16: getattr(lib, f"qv_decode_attention_bf16_{isa}")}
        for fn in self._attention.values():
            fn.argtypes = [_P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P, _P]
            fn.restype = _I
        self._norms = {torch.float32: lib.qv_rms_norm_f32, torch.bfloat16: lib.qv_rms_norm_bf16}
        for fn in self._norms.values():
            fn.argtypes = [_P, _P, ctypes.c_float, _P, _I, _I]
            fn.restype = _I
        # the decode step's own calls (step.c, attention.c's step entries): one dtype each, f32 / bf16
        self.attention_lanes = 16 if isa == "avx512" else 8  # the head size must be a multiple, up to 256
        self._attention_step, self._add_norm, self._rope_kv, self._silu_mul = {}, {}, {}, {}
        for dtype, kind in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            self._attention_step[dtype] = _typed(getattr(lib, f"qv_decode_attention_step_{kind}_{isa}"),
                                                 [_P] * 4 + [_I] * 4 + [_F, _P, _P], _I)
            self._add_norm[dtype] = _typed(getattr(lib, f"qv_add_rms_norm_{kind}"), [_P] * 3 + [_F, _P, _I], _I)
            self._rope_kv[dtype] = _typed(getattr(lib, f"qv_rope_kv_{kind}"), [_P, _P] + [_I] * 3 + [_P, _P, _I, _P])
            self._silu_mul[dtype] = _typed(getattr(lib, f"qv_silu_mul_{kind}"), [_P, _I, _P])
        self._to_bf16 = _typed(lib.qv_f32_to_bf16, [_P, _I, _P])

    @property
    def int4(self) -> bool:
        return self.int4_rows is not None

    def describe(self) -> str:
        """What serves, for --verbose: "native AVX-512 kernels (bfloat16, float32, int8, int4)"."""
        kinds = ["bfloat16", "float32", "int8"] + ["int4"] * self.int4
        return f"native {SET_NAMES[self.isa]} kernels ({', '.join(kinds)})"

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.bfloat16)  # bfloat16: AVX512-BF16's pairs, or AVX2's widening

    def gemv(self, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """weight # (N, K), x # (K,), bias # (N,) or None: all float32, all bfloat16, or a bfloat16 weight
        under float32 x and bias -> (N,) in x's dtype."""
        y = torch.empty(weight.shape[0], dtype=x.dtype)
        if self.bind_gemv(weight, bias, x, y)() == 0:
            raise MemoryError("the native product found no memory")
        return y

    # ---- bound calls: each bind_* checks its tensors once and answers a call of no arguments that reads x
    # and writes y (contiguous CPU tensors the caller keeps alive) when called; calls answering 0 failed
    # (out of memory), others None or 1. model/native_step.py strings them into a decode step.

    def bind_gemv(self, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor):
        """`gemv` into y (x's dtype)."""
        n, k = weight.shape
        if x.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"gemv: {x.dtype} activations (float32 or bfloat16 go)")
        widen = weight.dtype == torch.bfloat16 and x.dtype == torch.float32
        _expect("gemv", [(weight, (n, k))], torch.bfloat16 if widen else x.dtype)
        _expect("gemv", [(x, (k,)), (y, (n,))] + [(bias, (n,))] * (bias is not None), x.dtype)
        fn = self._bf16w if widen else self._f32 if x.dtype == torch.float32 else self._bf16
        return functools.partial(fn, weight.data_ptr(), x.data_ptr(), _ptr(bias), y.data_ptr(), n, k)

    def gemv_int8(self, weight: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """weight # (N, K) int8, scales # (N,) bfloat16, x # (K,) float32, bias # (N,) float32 or None
        -> (N,) float32: (W x) * scales (+ bias); with `int8_group` set, each group of that many of x taken
        as int16 times a power of two (as gemv_int4 takes it), the products summed exactly in int32."""
        y = torch.empty(weight.shape[0], dtype=torch.float32)
        if not self.bind_gemv_int8(weight, scales, bias, x, y)():
            raise MemoryError(f"int8 kernel: no memory for {weight.shape[1]} activations")
        return y

    def bind_gemv_int8(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                       x: torch.Tensor, y: torch.Tensor):
        """`gemv_int8` into y."""
        n, k = weight.shape
        _expect("int8 gemv", [(weight, (n, k))], torch.int8)
        _expect("int8 gemv", [(scales, (n,))], torch.bfloat16)
        _expect("int8 gemv", [(x, (k,)), (y, (n,))] + [(bias, (n,))] * (bias is not None), torch.float32)
        return functools.partial(self._int8, weight.data_ptr(), scales.data_ptr(), x.data_ptr(), _ptr(bias),
                                 y.data_ptr(), n, k)

    def gemv_int4(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, x: torch.Tensor,
                  bias: torch.Tensor | None, group: int) -> torch.Tensor:
        """packed # (N, K/2) uint8 in torch's int4 pack for this set (row blocks of `int4_rows`, see gemv.c
        and model/int4.py), scales_and_zeros # (K/group, N, 2) bfloat16, x # (K,) float32, bias # (N,)
        float32 or None -> (N,) float32: sum_k ((q - 8) * scale + zero) * x (+ bias), N % 16 == 0, with
        each group of x taken as int16 times a power of two (gemv.c: exact for bfloat16 values within 2^7 of
        the group's largest, else off by at most 2^-15 of it)."""
        y = torch.empty(packed.shape[0], dtype=torch.float32)
        if not self.bind_gemv_int4(packed, scales_and_zeros, bias, x, y, group)():
            raise MemoryError(f"int4 kernel: no memory for {packed.shape[1] * 2} activations")
        return y

    def bind_gemv_int4(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                       x: torch.Tensor, y: torch.Tensor, group: int):
        """`gemv_int4` into y."""
        n, k = packed.shape[0], packed.shape[1] * 2
        if (n % 16 or k % group or group % 2 or scales_and_zeros.shape != (k // group, n, 2)
                or x.shape != (k,) or x.dtype != torch.float32 or packed.dtype != torch.uint8
                or scales_and_zeros.dtype != torch.bfloat16):
            raise ValueError(f"int4 kernel: a {n}x{k} {packed.dtype} pack in groups of {group}, scales "
                             f"{tuple(scales_and_zeros.shape)} {scales_and_zeros.dtype}, x {tuple(x.shape)} {x.dtype}")
        _expect("int4 gemv", [(x, (k,)), (y, (n,))] + [(bias, (n,))] * (bias is not None), torch.float32)
        _expect("int4 gemv", [(packed, (n, k // 2))], torch.uint8)
        _expect("int4 gemv", [(scales_and_zeros, (k // group, n, 2))], torch.bfloat16)
        return functools.partial(self._int4, packed.data_ptr(), scales_and_zeros.data_ptr(),
                                 x.data_ptr(), _ptr(bias), y.data_ptr(), n, k, group)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        """Rows: x # (..., D), weight # (D,), both float32 or both bfloat16 -> (..., D), vision.RMSNorm's
        result to the bit (norm.c sums the squares in torch's order); None where it does not apply (other
        dtypes or devices, D < 8)."""
        fn = self._norms.get(x.dtype)
        if fn is None or x.device.type != "cpu" or weight.dtype != x.dtype or x.shape[-1:] != weight.shape:
            return None
        x, weight = x.contiguous(), weight.contiguous()
        y = torch.empty_like(x)
        dim = weight.numel()
        return y if fn(x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), x.numel() // max(dim, 1), dim) else None

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """One query per head over the cache, grouped: q # (1, H, 1, hd), k/v # (1, kv, L, hd) views of the
        cache (rows of hd contiguous, k and v alike), float32 or bfloat16 -> (1, H, 1, hd) in q's dtype,
        computed in float32 as text.decode_attention; None where it does not apply (a batch, other dtypes
        or layouts, hd not a multiple of the set's vector, 16 or 8 float32, up to 256)."""
        fn = self._attention.get(k.dtype)
        b, h, one, hd = q.shape
        _, kv, length, _ = k.shape
        if (fn is None or q.device.type != "cpu" or b != 1 or one != 1 or v.dtype != k.dtype
                or v.shape != k.shape or k.stride(3) != 1 or k.stride(2) != hd or v.stride() != k.stride()
                or kv == 0 or h % kv):
            return None
        qf = q.reshape(h, hd).float().contiguous()
        scratch = torch.empty(h, length)
        out = torch.empty(h, hd)
        if not fn(qf.data_ptr(), k.data_ptr(), v.data_ptr(), h, kv, length, hd, k.stride(1), hd**-0.5,
                  scratch.data_ptr(), out.data_ptr()):
            return None
        return out.to(q.dtype).view(1, h, 1, hd)

    def bind_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor,
                      residual: torch.Tensor | None = None):
        """y = RMSNorm(x) of one row x # (D,) (`rms_norm`'s bits); with `residual` # (D,), first x += residual
        in x's dtype (a decoder layer's `x + ...` before its next norm)."""
        dim = weight.numel()
        _expect("rms_norm", [(x, (dim,)), (weight, (dim,)), (y, (dim,))] + [(residual, (dim,))] * (residual is not None),
                x.dtype)
        if dim < 8:
            raise ValueError(f"rms_norm: rows of {dim}, shorter than a vector")
        if residual is None:
            return functools.partial(self._norms[x.dtype], x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), 1, dim)
        return functools.partial(self._add_norm[x.dtype], x.data_ptr(), residual.data_ptr(), weight.data_ptr(), eps,
                                 y.data_ptr(), dim)

    def bind_rope_kv(self, state: StepState, qkv: torch.Tensor, heads: int, k: torch.Tensor, v: torch.Tensor,
                     q: torch.Tensor):
        """One token's fused projections qkv # ((heads + 2 kv) hd,) into a layer's cache k/v # (1, kv, max_len,
        hd) at slot state.index, its q and k heads rotated by state.cos/sin (hd,) in qkv's dtype, as
        text.Attention.decode rotates them; the q heads to q # (heads, hd) float32 (step.c)."""
        _, kv, max_len, hd = k.shape
        _expect("rope_kv", [(qkv, ((heads + 2 * kv) * hd,)), (k, (1, kv, max_len, hd)), (v, (1, kv, max_len, hd))],
                qkv.dtype)
        _expect("rope_kv", [(q, (heads, hd))], torch.float32)
        if hd % 2:
            raise ValueError(f"rope_kv: head size {hd}")
        return functools.partial(self._rope_kv[qkv.dtype], ctypes.byref(state), qkv.data_ptr(), heads, kv, hd,
                                 k.data_ptr(), v.data_ptr(), max_len * hd, q.data_ptr())

    def bind_decode_attention(self, state: StepState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              scratch: torch.Tensor, out: torch.Tensor):
        """`decode_attention` of q # (H, hd) float32 over a layer's cache k/v # (1, kv, max_len, hd) up to slot
        state.index, into out # (H, hd) float32; scratch # (H, max_len) float32."""
        heads, hd = q.shape
        _, kv, max_len, _ = k.shape
        _expect("decode_attention", [(k, (1, kv, max_len, hd)), (v, (1, kv, max_len, hd))], k.dtype)
        _expect("decode_attention", [(q, (heads, hd)), (out, (heads, hd)), (scratch, (heads, max_len))],
                torch.float32)
        if hd % self.attention_lanes or hd > 256 or kv == 0 or heads % kv:
            raise ValueError(f"decode_attention: {heads} heads of {hd} over {kv}")
        return functools.partial(self._attention_step[k.dtype], ctypes.byref(state), q.data_ptr(), k.data_ptr(),
                                 v.data_ptr(), heads, kv, hd, max_len * hd, hd**-0.5, scratch.data_ptr(),
                                 out.data_ptr())

    def bind_silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor):
        """out # (n,) = F.silu(gate) * up of gate_up # (2n,) (gate, then up)."""
        n = out.numel()
        _expect("silu_mul", [(gate_up, (2 * n,)), (out, (n,))], out.dtype)
        return functools.partial(self._silu_mul[out.dtype], gate_up.data_ptr(), n, out.data_ptr())

    def bind_to_bfloat16(self, x: torch.Tensor, y: torch.Tensor):
        """y = x.to(torch.bfloat16) for x # (n,) float32."""
        _expect("to_bfloat16", [(x, y.shape)], torch.float32)
        _expect("to_bfloat16", [(y, x.shape)], torch.bfloat16)
        return functools.partial(self._to_bf16, x.data_ptr(), x.numel(), y.data_ptr())

    def rope_gather(self, src: torch.Tensor, column: int, heads: int, head_dim: int, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, gather: torch.Tensor) -> torch.Tensor:
        """The vision tower's q, k or v into padded segments: src # (N, C) float32 or bfloat16, contiguous,
        whose columns [column, column + heads * head_dim) hold each token's heads; gather # (S, Lmax) long
        (N for padding) -> (S, heads, Lmax, head_dim), a transposed view of (S, Lmax, heads, head_dim)
        memory, padding zeros. With cos/sin # (N, head_dim) float32 each vector is rotated as
        vision.apply_vision_rotary does, to the bit (vision.c); without, copied."""
        n, width = src.shape
        if (src.dtype not in (torch.float32, torch.bfloat16) or not src.is_contiguous() or head_dim % 2
                or column + heads * head_dim > width or gather.dtype != torch.long):
            raise ValueError(f"rope_gather: {tuple(src.shape)} {src.dtype} from column {column}, {heads}x{head_dim}")
        s, lmax = gather.shape
        gather = gather.contiguous()
        dst = torch.empty(s, lmax, heads, head_dim, dtype=src.dtype)
        rotate = cos is not None
        if rotate:
            cos, sin = cos.contiguous(), sin.contiguous()
            if cos.dtype != torch.float32 or cos.shape != (n, head_dim) or sin.shape != cos.shape:
                raise ValueError(f"rope_gather: cos/sin must be ({n}, {head_dim}) float32")
        self._rope(src.data_ptr() + column * src.element_size(), width, heads, head_dim,
                   cos.data_ptr() if rotate else None, sin.data_ptr() if rotate else None, gather.data_ptr(),
                   s * lmax, lmax, n, int(rotate), int(src.dtype == torch.bfloat16), dst.data_ptr())
        return dst.permute(0, 2, 1, 3)

    def scatter_rows(self, src: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        """src # (S, heads, Lmax, head_dim), head_dim contiguous; scatter # (N,) long, each token's slot in
        S * Lmax -> (N, heads * head_dim): token t's heads from slot scatter[t]."""
        s, heads, lmax, hd = src.shape
        if src.stride(3) != 1 or scatter.dtype != torch.long or scatter.dim() != 1:
            raise ValueError(f"scatter_rows: {tuple(src.shape)} strides {src.stride()}")
        if scatter.numel() and (int(scatter.min()) < 0 or int(scatter.max()) >= s * lmax):
            raise ValueError("scatter_rows: a slot out of range")
        scatter = scatter.contiguous()
        n = scatter.shape[0]
        dst = torch.empty(n, heads * hd, dtype=src.dtype)
        self._scatter(src.data_ptr(), src.element_size(), heads, lmax, hd, src.stride(0), src.stride(1),
                      src.stride(2), scatter.data_ptr(), n, dst.data_ptr())
        return dst


def _typed(fn, argtypes: list, restype=None):
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _expect(op: str, tensors: list, dtype: torch.dtype) -> None:
    """Each (tensor, shape) contiguous on the CPU in `dtype`, else ValueError naming `op`."""
    for t, shape in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
            raise ValueError(f"{op}: a {tuple(t.shape)} {t.dtype} tensor on {t.device} where a contiguous "
                             f"{tuple(shape)} {dtype} one goes")


def kernels() -> Kernels | None:
    return status().kernels


@functools.cache
def status() -> Status:
    if os.environ.get("QWENVL_NATIVE", "1") == "0":
        return Status(None, "torch's kernels (QWENVL_NATIVE=0)")
    found = usable_sets()
    if not found:
        return Status(None, "torch's kernels (the native ones need an x86-64 Linux CPU with AVX2 and FMA)")
    try:
        best = load(found[0])
    except (OSError, subprocess.SubprocessError, AttributeError, AssertionError) as exc:
        return Status(None, f"torch's kernels (native ones unavailable: {_first_line(exc)})", broken=True)
    return Status(best, best.describe())


def usable_sets() -> list[str]:
    """The instruction sets this CPU runs (keys of SETS), best first; none off x86-64 Linux."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return []
    flags = cpu_flags()
    return [isa for isa, needed in SETS.items() if needed <= flags]


def load(isa: str) -> Kernels:
    """The library's loops for `isa`, checked against torch (the CPU must run them: `usable_sets`)."""
    found = Kernels(_load(), isa, cpu_flags())
    _check(found)
    return found


def cache_dir() -> Path:
    """QWENVL_NATIVE_CACHE, else $XDG_CACHE_HOME/qwenvl/native (~/.cache/qwenvl/native)."""
    if os.environ.get("QWENVL_NATIVE_CACHE"):
        return Path(os.environ["QWENVL_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenvl" / "native"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _load() -> ctypes.CDLL:
    """The library, built again once if the cached file does not load (a truncated or foreign file)."""
    path = _library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(_library()))
    if lib.qv_abi() != ABI:
        raise OSError(f"{path} answers ABI {lib.qv_abi()}, not {ABI}")
    return lib


def _library() -> Path:
    """The built library for this source, compiler and flags: from the cache, else compiled into it (a
    temporary file renamed into place, so concurrent first runs never load half a file)."""
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang; or set CC)")
    resolved = shutil.which(cc) or cc
    try:
        stat = os.stat(resolved)
    except OSError as exc:
        raise OSError(f"C compiler {cc!r} not found") from exc
    key = hashlib.sha256(b"\0".join([*(path.read_bytes() for path in SOURCES), " ".join(FLAGS + LIBS).encode(),
                                     resolved.encode(), f"{stat.st_size}:{stat.st_mtime_ns}".encode()])).hexdigest()[:16]
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"qwenvl-native-{os.getuid()}"):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _owned(folder):
                continue  # someone else's (or a shared, writable) folder: never load code from it
        except OSError:
            continue  # an unwritable cache: try the next place
        target = folder / f"gemv-{key}.so"
        if target.is_file():
            return target
        tmp = folder / f".gemv-{key}.{os.getpid()}.so"
        sources = [str(path) for path in SOURCES if path.suffix == ".c"]
        run = subprocess.run([cc, *FLAGS, "-o", str(tmp), *sources, *LIBS], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{Path(cc).name} failed: {_first_line(run.stderr or run.stdout) or run.returncode}")
        os.replace(tmp, target)
        for old in folder.glob("gemv-*.so"):  # builds of other sources or compilers
            if old != target:
                old.unlink(missing_ok=True)
        return target
    raise OSError(f"cannot write the kernel cache {cache_dir()}")


def _owned(folder: Path) -> bool:
    """The folder is this user's and nobody else may write to it."""
    st = folder.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _check(found: Kernels) -> None:
    """Each kernel against torch on awkward shapes (tails of rows and of K) before any model uses it."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((13, 83), (40, 200)):
        w, x, b = (torch.randn(shape, generator=g) for shape in ((n, k), (k,), (n,)))
        want = torch.addmv(b.double(), w.double(), x.double())
        assert torch.allclose(found.gemv(w, x, b).double(), want, rtol=1e-5, atol=1e-5), "float32 check failed"
        wb, xb, bb = w.bfloat16(), x.bfloat16(), b.bfloat16()
        got = found.gemv(wb, xb, bb).double()
        want = torch.addmv(bb.double(), wb.double(), xb.double())
        assert torch.allclose(got, want, rtol=2**-7, atol=1e-2), "bfloat16 check failed"
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g).bfloat16()
        xq = x.double() if found.int8_group is None else quantized_activations(x, found.int8_group)
        want = (q.double() @ xq) * s.double() + b.double()
        assert torch.allclose(found.gemv_int8(q, s, x, b).double(), want, rtol=1e-5, atol=1e-4), "int8 check failed"
    if found.int4:  # 80 rows: one block of 64 and a tail of 16, or two of 32 and a tail; groups of 32
        n, k, group = 80, 96, 32
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        sz = torch.randn(k // group, n, 2, generator=g).bfloat16()
        x, b = torch.randn(k, generator=g), torch.randn(n, generator=g)
        scale, zero = sz.double().repeat_interleave(group, 0).unbind(2)  # (K, N) each
        want = ((q.double() - 8) * scale.t() + zero.t()) @ x.double() + b.double()
        got = found.gemv_int4(pack_int4_spelled(q, found.int4_rows), sz, x, b, group).double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-2), "int4 check failed"


def quantized_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x # (K,) float32 -> # (K,) float64: the values the int4 and AVX2 int8 kernels multiply by (gemv.c:
    quantize_x), each group of `group` (the last may be shorter) rounded half to even to a multiple of 2^e,
    its largest |x| at 2^14..2^15 - 1 times 2^e. Spelled in torch ops: the kernels' oracle."""
    k = x.shape[0]
    xd = torch.nn.functional.pad(x.double(), (0, -k % group)).view(-1, group)
    top = xd.abs().amax(1)
    e = torch.frexp(top)[1].double() - 15
    e = torch.where(torch.ldexp(top, -e) >= 32767.5, e + 1, e)
    e = torch.where(top > 0, e, torch.zeros_like(e))[:, None]
    return (torch.round(torch.ldexp(xd, -e)) * torch.exp2(e)).view(-1)[:k]


def pack_int4_spelled(q: torch.Tensor, block_rows: int) -> torch.Tensor:
    """q # (N, K) uint8 in [0, 15] -> (N, K/2) uint8 in torch's int4 pack with row blocks of `block_rows`
    (64: its AVX-512 build, 32: its AVX2 one), spelled out (gemv.c says the layout; model/int4.py packs
    with torch's own op): k-major blocks, byte j = row j | row j + block_rows/2 << 4; a tail of
    N % block_rows rows pairs rows 2j | 2j + 1 << 4."""
    n, k = q.shape
    full = n // block_rows * block_rows
    blocks = q[:full].view(-1, 2, block_rows // 2, k)  # (B, half, j, K)
    head = (blocks[:, 0] | blocks[:, 1] << 4).transpose(1, 2).reshape(full, k // 2)
    tail = q[full:].view(-1, 2, k)  # (T/2, pair, K)
    rest = (tail[:, 0] | tail[:, 1] << 4).t().reshape(n - full, k // 2)
    return torch.cat([head, rest]).contiguous()


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    return set(_cpu_info()[1])


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD); empty elsewhere."""
    return _cpu_info()[0]


@functools.cache
def _cpu_info() -> tuple[str, frozenset[str]]:
    vendor, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return vendor, flags


def _first_line(thing) -> str:
    return next((line.strip() for line in str(thing).splitlines() if line.strip()), "")
