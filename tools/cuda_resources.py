"""Compile-level resources of the CUDA kernels (csrc/hmx_cuda_*.cu), measured without a GPU.

`cuda_kernel_rows(archs=("80", "90"))` compiles every .cu with the flags of the real build
(hmx_kernels/cpp/build.py's NVCC_FLAGS plus the defines torch.utils.cpp_extension adds for nvcc)
and `-Xptxas -v`, one nvcc at a time under `nice`, and returns one dict per (arch, shape, dtype,
kernel) with the keys of FIELDS:
- arch "sm_80" / "sm_90", shape "d_h,k_h" (e.g. "18,72", as the Triton rows), dtype "fp32" / "fp16" / "bf16",
  backend "cuda", kernel (state, fwd_finalize, mix, bwd_prep, query, bwd_mid, key, bwd_final, their
  *_blocked twins for mixing blocks, sum_parts, block_window, row_sums), config "T<tile>-w8" (token tile, or k_h rows per step of a finalize kernel; 8 warps);
- registers and spill_bytes (spill stores + spill loads) from ptxas;
- smem_bytes: the dynamic shared memory the launcher asks for (the kernels' own size function,
  hmx::cuda::kernel_table, run on the host through a small nvcc-built program) plus ptxas' static
  shared memory;
- tensor_core_instructions: HMMA + HGMMA instructions in that kernel's SASS (cuobjdump -sass).
The kernels depend on d_h through its head block (32, 64, 128) and not on k_h (k_h is walked in
blocks at run time), so shapes with the same block share their compiled kernels.

`python -m tools.kernels` puts these rows into benchmarks/results/kernels.csv (backend
"cuda", next to the Triton rows), the ones the backend declines (`decline_reason`) into
kernels-limit.csv with the reason; `python -m tools.cuda_resources` compiles and prints a
summary only. Nothing here runs a kernel: this is evidence about registers, spills, shared memory and the
instructions emitted, not about speed or correctness on a GPU.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
RESULTS = ROOT / "benchmarks" / "results"
CSV_PATH = RESULTS / "kernels.csv"  # every row a backend may run (both backends)
LIMIT_CSV_PATH = RESULTS / "kernels-limit.csv"  # rows compiled but declined, with the reason
FIELDS = ["arch", "shape", "dtype", "backend", "kernel", "config", "registers", "spill_bytes", "smem_bytes",
          "tensor_core_instructions"]
SHAPES: Tuple[Tuple[int, int], ...] = ((18, 72), (32, 128), (64, 256), (128, 512))
DTYPES = ("fp32", "fp16", "bf16")
# the plain passes, the passes of blocked mixing (chunk-causal, packed: *_blocked), and the three that
# only add: the weight-gradient sums, the block / window sums of blocked mixing and the row sums of
# sequence parallelism
KERNELS = ("state", "fwd_finalize", "mix", "bwd_prep", "query", "bwd_mid", "key", "bwd_final",
           "state_blocked", "mix_blocked", "query_blocked", "key_blocked", "fwd_finalize_blocked", "bwd_prep_blocked",
           "bwd_mid_blocked", "bwd_final_blocked", "sum_parts", "block_window", "row_sums")
ADD_KERNELS = ("sum_parts", "block_window", "row_sums")  # not templates: one per arch, no matrix products
MATMUL_KERNELS = tuple(k for k in KERNELS if k not in ADD_KERNELS)
THREADS = 256
# opt-in shared memory per block: A100 (sm_80) 163 KB, H100 / H200 (sm_90) 227 KB
SMEM_LIMITS = {"sm_80": 166912, "sm_90": 232448}
MAX_REGISTERS = 255
# Itanium mangling of the template argument T of kernel<T, D>
_TYPE_TAGS = {"f": "fp32", "6__half": "fp16", "13__nv_bfloat16": "bf16"}
_KERNEL_RE = re.compile(r"_ZN3hmx4cuda\d+(\w+?)_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)EE")
_ADD_RES = {k: re.compile(r"_ZN3hmx4cuda\d+" + k + "_kernel") for k in ADD_KERNELS}


def head_block(d_h: int) -> int:
    """The padded head block of the kernels (hmx::cuda::head_block)."""
    return 32 if d_h <= 32 else 64 if d_h <= 64 else 128 if d_h <= 128 else 0


def build_flags() -> List[str]:
    """nvcc flags of the real build: build.py's NVCC_FLAGS plus torch's nvcc defines."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from hmx_kernels.cpp.build import NVCC_FLAGS

    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:  # pragma: no cover - the defines torch has used so far
        COMMON_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    return list(dict.fromkeys(list(NVCC_FLAGS) + list(COMMON_NVCC_FLAGS)))


def find_nvcc() -> Optional[str]:
    return shutil.which("nvcc")


def find_cuobjdump() -> Optional[str]:
    """cuobjdump on PATH, next to nvcc, or the copy triton's NVIDIA backend ships (with nvdisasm)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = find_nvcc()
    candidates = [Path(os.path.realpath(nvcc)).parent / "cuobjdump"] if nvcc else []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _run(cmd: Sequence[str], what: str, env=None) -> str:
    proc = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {' '.join(cmd)}\n{proc.stdout}")
    return proc.stdout


def nvcc(args: Sequence[str], what: str, extra_flags: Sequence[str] = ()) -> str:
    """One nvcc call with the build flags (lowest priority, shared machines), its output."""
    cmd = ["nice", "-n", "19", find_nvcc(), *build_flags(), *extra_flags, f"-I{CSRC}", *args]
    return _run(cmd, what)


def compile_objects(archs: Iterable[str], out_dir: Path, extra_flags: Sequence[str] = ()) -> Dict[str, Tuple[Path, str]]:
    """Every csrc/*.cu compiled to an object for `archs` (e.g. ("80", "90"); the first one's PTX is
    embedded too) with `-Xptxas -v`: {source name: (object, nvcc output)}."""
    archs = list(archs)
    gencode = []
    for i, a in enumerate(archs):
        code = f"[sm_{a},compute_{a}]" if i == 0 else f"sm_{a}"
        gencode += ["-gencode", f"arch=compute_{a},code={code}"]
    out = {}
    for src in sorted(CSRC.glob("*.cu")):
        obj = Path(out_dir) / (src.stem + ".o")
        log = nvcc(["-c", *gencode, "-Xptxas", "-v", str(src), "-o", str(obj)], src.name, extra_flags)
        out[src.name] = (obj, log)
    return out


def parse_ptxas(log: str) -> Dict[Tuple[str, str], dict]:
    """{(arch, mangled kernel): {registers, spill_bytes, static_smem}} from `ptxas -v` output."""
    stats: Dict[Tuple[str, str], dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = (m.group(2), m.group(1))
            stats[current] = {"registers": 0, "spill_bytes": 0, "static_smem": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            stats[current]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            stats[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            stats[current]["static_smem"] = int(s.group(1)) if s else 0
    return stats


def sass_functions(obj: Path) -> Dict[Tuple[str, str], str]:
    """{(arch, mangled kernel): SASS text} of an object file (cuobjdump -sass)."""
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (PATH, the CUDA toolkit or triton's backends/nvidia/bin)")
    env = dict(os.environ, PATH=str(Path(tool).parent) + os.pathsep + os.environ.get("PATH", ""))  # nvdisasm
    text = _run([tool, "-sass", str(obj)], f"cuobjdump -sass {obj.name}", env=env)
    out: Dict[Tuple[str, str], str] = {}
    # "arch = sm_XX" opens each architecture's section, "Function : NAME" each kernel in it
    for part in re.split(r"^\s*arch = ", text, flags=re.M)[1:]:
        arch = part.split(None, 1)[0]
        pieces = re.split(r"^\s*Function : (\S+)", part, flags=re.M)
        for name, body in zip(pieces[1::2], pieces[2::2]):
            out[(arch, name)] = out.get((arch, name), "") + body
    return out


def ptx_text(obj: Path) -> str:
    """The PTX embedded in an object (compile_objects embeds the first arch's)."""
    tool = find_cuobjdump()
    env = dict(os.environ, PATH=str(Path(tool).parent) + os.pathsep + os.environ.get("PATH", ""))
    return _run([tool, "-ptx", str(obj)], f"cuobjdump -ptx {obj.name}", env=env)


def tensor_core_count(sass: str) -> int:
    return len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass))


def kernel_id(mangled: str) -> Optional[Tuple[str, Optional[str], Optional[int]]]:
    """(kernel, dtype, head block) of a mangled kernel name (dtype / block None for ADD_KERNELS)."""
    m = _KERNEL_RE.search(mangled)
    if m:
        return m.group(1), _TYPE_TAGS[m.group(2)], int(m.group(3))
    for kernel, rx in _ADD_RES.items():
        if rx.search(mangled):
            return kernel, None, None
    return None


_DRIVER = r"""
#include <cstdio>
#include "hmx_cuda_plan.cuh"
using namespace hmx::cuda;
int main() {
  const char* names[3] = {"fp32", "fp16", "bf16"};
  const DType types[3] = {DType::kF32, DType::kF16, DType::kBF16};
  const int dhs[] = {DHS};
  for (int i = 0; i < 3; ++i)
    for (int dh : dhs) {
      KernelSize t[kMaxKernels];
      const int n = kernel_table(types[i], dh, t);
      for (int k = 0; k < n; ++k)
        printf("{\"kind\": \"smem\", \"dtype\": \"%s\", \"d_h\": %d, \"kernel\": \"%s\", \"tile\": %d, \"smem\": %zu}\n",
               names[i], dh, t[k].name, t[k].tile, t[k].smem);
    }
  // token chunks of the grid rule: clamp(ceil(2 SMs / (B H)), 1, ceil(L / tile))
  const long long cases[][4] = {{1, 8, 1024, 64}, {1, 8, 4096, 64}, {1, 8, 4096, 32}, {4, 8, 4096, 64},
                                {64, 8, 4096, 64}, {1, 8, 100, 64}};
  for (const auto& c : cases)
    for (int sms : {108, 132})
      printf("{\"kind\": \"chunks\", \"B\": %lld, \"H\": %lld, \"L\": %lld, \"tile\": %lld, \"sms\": %d, \"chunks\": %lld}\n",
             c[0], c[1], c[2], c[3], sms, (long long)token_chunks(c[2], c[0] * c[1], (int)c[3], sms));
  return 0;
}
"""


def host_tables(d_hs: Iterable[int], work_dir: Path) -> List[dict]:
    """Run the kernels' host-side size and grid functions (hmx_cuda_plan.cuh) in a small program
    built with nvcc (host code only: no GPU needed): one dict per printed line."""
    src = Path(work_dir) / "hmx_cuda_sizes.cu"
    src.write_text(_DRIVER.replace("DHS", ", ".join(str(int(x)) for x in d_hs)))
    exe = Path(work_dir) / "hmx_cuda_sizes"
    nvcc([str(src), "-o", str(exe)], "host size table")
    out = _run([str(exe)], "host size table")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def rows_from(objects: Dict[str, Tuple[Path, str]], tables: List[dict], archs: Iterable[str],
              shapes: Iterable[Tuple[int, int]] = SHAPES) -> List[dict]:
    """The report rows from compiled objects (compile_objects) and the host tables."""
    stats: Dict[Tuple[str, str], dict] = {}
    sass: Dict[Tuple[str, str], str] = {}
    for obj, log in objects.values():
        stats.update(parse_ptxas(log))
        sass.update(sass_functions(obj))
    # (arch, kernel, dtype, block) -> mangled name
    by_id: Dict[tuple, str] = {}
    for arch, name in stats:
        kid = kernel_id(name)
        if kid is not None:
            by_id[(arch,) + kid] = name
    smem = {(t["dtype"], t["d_h"], t["kernel"]): t for t in tables if t["kind"] == "smem"}
    rows = []
    for a in archs:
        arch = f"sm_{a}"
        for d_h, k_h in shapes:
            D = head_block(d_h)
            for dtype in DTYPES:
                for kernel in KERNELS:
                    if kernel in ADD_KERNELS:
                        name = by_id[(arch, kernel, None, None)]
                        config, dyn = f"T1-w{THREADS // 32}", 0
                    else:
                        name = by_id[(arch, kernel, dtype, D)]
                        t = smem[(dtype, d_h, kernel)]
                        config, dyn = f"T{t['tile']}-w{THREADS // 32}", t["smem"]
                    st = stats[(arch, name)]
                    rows.append({
                        "arch": arch, "shape": f"{d_h},{k_h}", "dtype": dtype, "backend": "cuda", "kernel": kernel,
                        "config": config, "registers": st["registers"], "spill_bytes": st["spill_bytes"],
                        "smem_bytes": dyn + st["static_smem"],
                        "tensor_core_instructions": tensor_core_count(sass.get((arch, name), "")),
                    })
    return rows


def cuda_kernel_rows(archs: Sequence[str] = ("80", "90"), shapes: Iterable[Tuple[int, int]] = SHAPES) -> List[dict]:
    """Compile every csrc/*.cu for `archs` and return one row per (arch, shape, dtype, kernel)."""
    if find_nvcc() is None:
        raise RuntimeError("nvcc not on PATH")
    shapes = list(shapes)
    with tempfile.TemporaryDirectory(prefix="hmx_cuda_res_") as tmp:
        objects = compile_objects(archs, Path(tmp))
        tables = host_tables(sorted({d for d, _ in shapes}), Path(tmp))
        return rows_from(objects, tables, archs, shapes)


def unsupported(row: dict) -> bool:
    """Shapes the CUDA backend declines (hmx::cuda::not_supported; the backend's extra_reasons):
    fp32 kernels at d_h > 64 on sm_80, whose query / key kernels need more than 163 KB."""
    return row["arch"] == "sm_80" and row["dtype"] == "fp32" and int(row["shape"].split(",")[0]) > 64


def decline_reason(row: dict) -> Optional[str]:
    """Why the CUDA backend never runs this row's kernel on that arch, or None."""
    if not unsupported(row):
        return None
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from hmx_kernels.cpp.cuda import CUDA_WIDE_FP32_SMEM_BYTES

    return (f"declined on sm_80 (the whole shape, every kernel): fp32 kernels at d_h > 64 need "
            f"{CUDA_WIDE_FP32_SMEM_BYTES} B of shared memory per block (query / key), more than sm_80's "
            f"{SMEM_LIMITS['sm_80']} B (hmx_kernels/cpp/cuda.py _cuda_extra_reasons, hmx::cuda::not_supported)")


def read_csv(path: Path = CSV_PATH, limit_path: Optional[Path] = LIMIT_CSV_PATH) -> List[dict]:
    """The committed CUDA rows (backend "cuda") of kernels.csv and, unless limit_path is None, of
    kernels-limit.csv, with the columns of FIELDS and integer counts."""
    rows = []
    for p in [path] + ([limit_path] if limit_path is not None else []):
        with open(p, newline="") as f:
            rows += [{k: r[k] for k in FIELDS} for r in csv.DictReader(f) if r["backend"] == "cuda"]
    for r in rows:
        for k in ("registers", "spill_bytes", "smem_bytes", "tensor_core_instructions"):
            r[k] = int(r[k])
    return rows


def summary(rows: List[dict]) -> str:
    lines = []
    for arch in sorted({r["arch"] for r in rows}):
        rs = [r for r in rows if r["arch"] == arch]
        ok = [r for r in rs if not unsupported(r)]
        lines.append(
            f"{arch}: {len(rs)} rows, max registers {max(r['registers'] for r in rs)}, "
            f"spill bytes {sum(r['spill_bytes'] for r in rs)}, max smem {max(r['smem_bytes'] for r in ok)} B "
            f"(limit {SMEM_LIMITS[arch]}), tensor-core instructions per half kernel "
            f"{min(r['tensor_core_instructions'] for r in rs if r['dtype'] != 'fp32' and r['kernel'] in MATMUL_KERNELS)}"
            f"..{max(r['tensor_core_instructions'] for r in rs)}, in fp32 kernels "
            f"{sum(r['tensor_core_instructions'] for r in rs if r['dtype'] == 'fp32')}")
        over = sorted({(r["shape"], r["dtype"]) for r in rs if unsupported(r)})
        if over:
            lines.append(f"  declined on {arch} (shared memory): " + ", ".join(f"{s} {d}" for s, d in over))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    rows = cuda_kernel_rows()
    print(f"{len(rows)} rows compiled (python -m tools.kernels writes them to benchmarks/results/kernels.csv)")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
