"""The package's own CPU kernels (cpu_kernels.cpp): the 4-bit and 8-bit products with int8 activations in blocks
of 32 (integer dot products, VNNI or AVX2, where ATen's take bf16 ones), and the decode step, every layer of a
step's decode rows in one call (eager PyTorch spends more of a decode step between its ~1,600 small
operations than in them). Built with the system's C++ compiler the first time a CPU model loads (about 2 s;
never on import) into LLAMA_PKG_KERNEL_CACHE and loaded with ctypes; linked to the OpenMP runtime torch
loaded, so its threads are torch's. Why rows keep their bits: cpu_kernels.cpp's header and
docs/batch-invariance.md.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("llama_pkg")
SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-fPIC", "-std=c++17", "-ffp-contract=off"]
ISA = {"avx2": ["-mavx2", "-mfma", "-mf16c", "-DUSE_VNNI=0"],
       "vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512vnni", "-DUSE_VNNI=1"]}
MODES = ("auto", "on", "off")  # LLAMA_PKG_CPU_KERNELS


class Unavailable(RuntimeError):
    """The kernel cannot be built or run here (the reason is the message)."""


def openmp_library():
    """The OpenMP runtime this process loaded with torch (its path), or None."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in maps:
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if any(name in Path(path).name for name in ("libgomp", "libiomp")):
            return path
    return None


def cache_dir():
    from .. import settings

    return Path(os.path.expanduser(settings.get("LLAMA_PKG_KERNEL_CACHE")))


def build(where=None):
    """Compile cpu_kernels.cpp (both instruction sets) into a shared library -> its path (reused when it exists).
    Its name hashes the source, the flags, torch's version and the path of the OpenMP runtime it links."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise Unavailable(f"the kernel is written for x86-64 (AVX2), this CPU is {platform.machine()}")
    omp = openmp_library()
    openmp = ["-fopenmp"] if omp else []
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, ISA, omp, torch.__version__)).encode())
    where = Path(where or cache_dir())
    target = where / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():  # built before, here or into an image (no compiler needed to load it)
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        raise Unavailable("no C++ compiler found (g++, c++ or clang++; or set CXX)")
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        objects = []
        for isa, flags in ISA.items():
            objects.append(f"{tmp}/{isa}.o")
            _run([compiler, *FLAGS, *openmp, *flags, "-c", str(SOURCE), "-o", objects[-1]])
        # linked to the very OpenMP file torch loaded: its soname resolves to that copy, one thread pool
        _run([compiler, "-shared", *objects, *([omp, f"-Wl,-rpath,{Path(omp).parent}"] if omp else []),
              "-o", f"{tmp}/lib.so"])
        os.replace(f"{tmp}/lib.so", target)  # atomic: a concurrent build finds a whole file or none
    log.info("CPU kernel built: %s", target)
    return target


def _run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise Unavailable(f"compiling {SOURCE.name} failed: {' '.join(command)}\n{done.stderr[-2000:]}")


_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


class Part(ctypes.Structure):
    _fields_ = [("n", _I), ("k", _I), ("group", _I), ("bits", _I), ("qs", _P), ("perm", _P)]


class Lin(ctypes.Structure):
    _fields_ = [("parts", _I), ("part", Part * 3)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("qkv", Lin), ("o", Lin), ("gate_up", Lin), ("down", Lin),
                ("keys", _P), ("values", _P)]


class Model(ctypes.Structure):
    _fields_ = [("layers", _I), ("dim", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I), ("inter", _I),
                ("eps", ctypes.c_float), ("cos", _P), ("sin", _P), ("final_norm", _P), ("layer", ctypes.POINTER(Layer))]


class Kernels:
    """The loaded library. isa: "vnni" or "avx2" (the build that runs; both give the same bits)."""

    def __init__(self, path, isa=None):
        self.lib = ctypes.CDLL(str(path))
        if not self.lib.cpu_kernels_has_avx2():
            raise Unavailable("this CPU lacks AVX2 and FMA, which the kernel needs")
        self.isa = isa or ("vnni" if self.lib.cpu_kernels_has_vnni() else "avx2")
        self._linear = getattr(self.lib, f"int_linear_{self.isa}")
        self._linear.argtypes = [ctypes.POINTER(Lin), _I, _P, _L, _P, _L, _I]
        self._linear.restype = None
        self._step = getattr(self.lib, f"decode_step_{self.isa}")
        self._step.argtypes = [ctypes.POINTER(Model), _I, _P, _P, _P, _P, _P, _L, _P, _I, _I]
        self._step.restype = None

    def linear(self, x, packed):
        """x [M, K], any float dtype @ packed's weights (a Packed or Packed8) -> float32 [M, N]."""
        x = x.float()
        x = x if x.stride(-1) == 1 else x.contiguous()
        y = torch.empty(x.shape[0], packed.n)
        if x.shape[0]:
            self._linear(ctypes.byref(packed.lin), x.shape[0], x.data_ptr(), x.stride(0), y.data_ptr(), packed.n,
                         torch.get_num_threads())
        return y


class Packed:
    """4-bit weights in the kernel's layout (cpu_kernels.cpp's header): W[n, k] = d[g, n] * q[n, k] + m[g, n],
    d and m in fp16 beside their group's nibbles. perm: act-order's input order (int64 [K]) or None."""

    def __init__(self, q, scales, zeros, group, perm=None):
        """q [N, K] in 0..15; scales, zeros [K / group, N] in ATen's terms, W = (q - 8) * scale + zero."""
        self.n, self.k = q.shape
        self.group, self.perm = group, None if perm is None else perm.to(torch.int64).contiguous()
        tiles, groups = self.n // 8, self.k // group
        v = q.to(torch.uint8).reshape(tiles, 8, self.k // 32, 8, 4).permute(0, 2, 3, 1, 4)
        nibbles = (v[:, :, :4] | (v[:, :, 4:] << 4)).reshape(tiles, groups, group * 4)
        d = scales.float()
        dm = torch.stack([d, zeros.float() - 8 * d]).reshape(2, groups, tiles, 8).permute(2, 1, 0, 3)
        self.qs = torch.cat([nibbles, dm.half().contiguous().view(torch.uint8).reshape(tiles, groups, 32)], dim=-1)
        self.lin = lin_of([self])

    def part(self):
        return Part(self.n, self.k, self.group, 4, self.qs.data_ptr(),
                    self.perm.data_ptr() if self.perm is not None else None)

    @staticmethod
    def fits(n, k, group, scales, zeros):
        """The kernel's shapes, and scales and offsets within fp16's range."""
        big = max(scales.abs().max().item(), (zeros.float() - 8 * scales.float()).abs().max().item())
        return n % 8 == 0 and group % 32 == 0 and k % group == 0 and big < 65504


class Packed8:
    """8-bit weights in the kernel's layout (cpu_kernels.cpp, tile8): W[n, k] = q[n, k] * scale[n], q in -127..127."""

    def __init__(self, q, scales):
        self.n, self.k = q.shape
        tiles, blocks = self.n // 8, self.k // 32
        v = q.to(torch.int8).reshape(tiles, 8, blocks, 8, 4).permute(0, 2, 3, 1, 4)  # [tiles, blocks, h, i, j]
        self.qs = torch.cat([v.contiguous().view(torch.uint8).reshape(tiles, blocks * 256),
                             scales.float().reshape(tiles, 8).contiguous().view(torch.uint8)], dim=1)
        self.lin = lin_of([self])

    def part(self):
        return Part(self.n, self.k, self.k, 8, self.qs.data_ptr(), None)

    @staticmethod
    def fits(n, k):
        return n % 8 == 0 and k % 32 == 0


def lin_of(packed):
    """A Lin of up to 3 Packed that read one input (outputs side by side)."""
    if not 1 <= len(packed) <= 3 or len({p.k for p in packed}) != 1:
        raise ValueError("a Lin is 1 to 3 Packed of one input size")
    lin = Lin(len(packed))
    for i, p in enumerate(packed):
        lin.part[i] = p.part()
    return lin


class DecodeStep:
    """Every layer of a batch of decode rows in one call of the kernel library (cpu_kernels.cpp's decode_step):
    the norms, RoPE, the bf16 cache writes, softmax attention over each row's positions, SiLU and the residual
    adds in C, around the integer products; each row computed apart from the others, its sums in an order its
    position alone sets. What the CPU engine's decode rows take when every Linear runs on the package's kernel;
    `of` says whether they do."""

    def __init__(self, kernels, model, cache):
        c = model.config
        self.kernels, self.model, self.cache = kernels, model, cache  # the structures point into them
        self._keep = []  # and into these
        layers = (Layer * c.layers)()
        for i, layer in enumerate(model.layers):
            norms = [layer["attn_norm"].float().contiguous(), layer["mlp_norm"].float().contiguous()]
            self._keep += norms
            layers[i] = Layer(norms[0].data_ptr(), norms[1].data_ptr(), *(_lin(layer[n]) for n in LINEARS),
                              cache.keys[i].data_ptr(), cache.values[i].data_ptr())
        tables = [model.cos.contiguous(), model.sin.contiguous(), model.norm.float().contiguous()]
        self._keep += tables
        self._layers = layers
        self.struct = Model(c.layers, c.hidden_size, c.heads, c.kv_heads, c.head_dim, c.intermediate_size,
                            c.rms_norm_eps, tables[0].data_ptr(), tables[1].data_ptr(), tables[2].data_ptr(), layers)

    @classmethod
    def of(cls, model, cache):
        """A DecodeStep for this model and cache, or None where the kernel cannot take them all."""
        c = model.config
        fits = (model.dtype == torch.float32 and cache.keys[0].dtype == torch.bfloat16 and c.head_dim % 8 == 0
                and c.head_dim <= 256 and c.hidden_size % 8 == 0 and c.intermediate_size % 8 == 0
                and all(_lin(layer[n]) is not None for layer in model.layers for n in LINEARS))
        return cls(_kernels_of(model.layers[0]["qkv"]), model, cache) if fits else None

    def __call__(self, tokens, positions, write, tables, table_rows, block_size):
        """tokens, positions, write (cache slots), table_rows: int64 [M]; tables: int32 [rows, width] ->
        the final-normed hidden states [M, dim], float32. Writes each row's keys and values."""
        x = self.model.embed.index_select(0, tokens).float().contiguous()
        out = torch.empty_like(x)
        self.kernels._step(ctypes.byref(self.struct), x.shape[0], x.data_ptr(), out.data_ptr(), positions.data_ptr(),
                           write.data_ptr(), tables.data_ptr(), tables.stride(0), table_rows.data_ptr(), block_size,
                           torch.get_num_threads())
        return out


LINEARS = ("qkv", "o", "gate_up", "down")


def _kernels_of(linear):
    return getattr(linear, "kernels", None) or getattr(linear.parts[0], "kernels", None)


def _lin(linear):
    """The Lin of a CPU Linear when the package's kernel runs it whole, else None."""
    parts = getattr(linear, "parts", [linear])
    if len(parts) > 3 or any(getattr(p, "kernels", None) is None for p in parts):
        return None
    return lin_of([p.packed for p in parts])


_LOADED = {}


def load(mode="auto"):
    """The kernels for LLAMA_PKG_CPU_KERNELS: "off" -> None; "on" -> Kernels or Unavailable; "auto" -> Kernels,
    or None with a warning saying why ATen's kernels run instead."""
    if mode == "off":
        return None
    if "kernels" not in _LOADED:
        try:
            _LOADED["kernels"] = Kernels(build())
        except (Unavailable, OSError) as e:  # OSError: the cache folder not writable, the file not loadable
            _LOADED["kernels"] = Unavailable(str(e))
    kernels = _LOADED["kernels"]
    if isinstance(kernels, Unavailable):
        if mode == "on":
            raise Unavailable(f"LLAMA_PKG_CPU_KERNELS=on: {kernels}")
        log.warning("CPU kernel unavailable (%s): ATen's 4-bit kernel runs instead (slower)", kernels)
        return None
    return kernels
