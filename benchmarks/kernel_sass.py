"""What a decode kernel costs per tile, read from its machine code (no GPU needed): compile a decode path for a
GPU architecture with Triton's own ``ptxas`` and count the instructions of its main loop by kind.

``python benchmarks/kernel_sass.py [--arch 90] [--bits 2 3 4] [--min-rows 16 1]`` writes
``benchmarks/results/kernel_sass.json``: per shape (GQA, G = 4 query heads per KV head; MHA, G = 1) and bit width, the
path and launch the tuning table's rules pick on the H200 (``cuda_core`` runs one query head a program), the
instructions one warp issues per tile of the main loop, per code (key and value elements of one KV head read by
one program), and by kind (unpack: shifts, LOP3,
byte permutes, fp16x2 adds; tensor-core MMAs; shared-memory traffic; predicates; local-memory spills), the
register copies (``MOV``, ``IMAD.MOV``: operand shuffles, e.g. query rows padded inside the MMA), and
the registers per thread and spill stack (``cuobjdump -res-usage``) and the shared memory per program, which bound
the programs an SM holds (``programs_per_sm``, Hopper's limits).
Counts are per warp and per tile; with ``num_warps`` warps a tile of ``tile`` tokens costs
``num_warps * per_tile`` warp instructions for ``tile * 2 * head_dim`` codes.

The kernel is compiled as the launcher specialises it: pointer arguments 16-byte aligned (records before
``"aligned": true`` lacked that, so their loads were 2-byte scalars and their counts too high).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvbench.kernels import tuning  # noqa: E402
from kvbench.kernels.triton import cuda_core, tensor_core  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = {
    "unpack": ("SHF", "LOP3", "PRMT", "HADD2", "HFMA2"), "mma": ("HMMA", "HGMMA"), "shared": ("LDS", "STS", "LDSM"),
    "global": ("LDG", "LDGSTS"), "predicates": ("ISETP", "P2R", "R2P", "PLOP3"), "spills": ("LDL", "STL"),
    "barriers": ("BAR",), "float": ("FMUL", "FADD", "FFMA", "FMNMX", "FSEL", "MUFU", "F2FP"),
}
ARGS = ("q_ptr kw_ptr ks_ptr kz_ptr vw_ptr vs_ptr vz_ptr sk_ptr sv_ptr rk_ptr rv_ptr o_ptr lse_ptr sm_scale T_CAP "
        "NB_CAP S_CAP R_CAP packed_len_ptr n_sink recent_len_ptr unit n_splits").split()  # common.launch_args
PATHS = {  # path: (kernel, its arguments after the common ones)
    "tensor_core": (tensor_core._tensor_core_kernel, ["qk_ptr", "bias_ptr", "k_desc", "k_low_desc", "v_desc",
                                                      "v_low_desc"]),
    "cuda_core": (cuda_core._cuda_core_kernel, []),
}
GROUPS = {"gqa": 4, "mha": 1}  # query heads per KV head of the counted shapes (Llama-3-8B, Llama-2-7B heads)
BATCHES = (1, 8)  # the benchmark's batches: a rule may hold for batch 1 only (``max_batch``)


def constants(path: str, bits: int, G: int, D: int, rule: dict) -> dict:
    if path == "tensor_core":
        return tensor_core.constants(G, bits, D, 128, rule["tile"], rule.get("min_rows", 16), True,
                                     rule.get("m_axis", "group"), rule.get("inline_table", 0), rule.get("tma", 0),
                                     rule.get("qk_regs", False))
    return cuda_core.constants(G, bits, bits, D, 128, rule["tile"], rule["vec"], rule["fields"], True)


def _sig(name: str) -> str:
    if name in ("kw_ptr", "vw_ptr"):
        return "*i32"
    if name in ("recent_len_ptr", "packed_len_ptr"):
        return "*i64"
    if name in ("o_ptr", "lse_ptr", "bias_ptr"):
        return "*fp32"
    if name.endswith("_ptr"):
        return "*fp16"
    return "fp32" if name == "sm_scale" else "i32"


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (a conditional backward branch) of a SASS listing."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [re.match(r"^(\.L_x_\d+):", line)] if m}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"@!?U?P\w+\s+BRA\s+`?\(?(\.L_x_\d+)", line)  # a loop's back edge is conditional (an
        # unconditional jump back comes from out-of-line code, e.g. a barrier wait's retry)
        if m and labels.get(m.group(1), len(lines)) < i:
            body = [x for x in lines[labels[m.group(1)]: i + 1] if re.match(r"\s+/\*[0-9a-f]{4,}\*/", x)]
            best = max(best, body, key=len)
    return best


def opcode(line: str) -> str:
    return re.sub(r"\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?", "", line).split()[0].split(".")[0]


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Programs resident on one Hopper SM at once (64K registers, allocated per warp in units of 256; 227 KB of
    shared memory per SM, 1 KB of it reserved per program; at most 32 programs, 64 warps)."""
    by_regs = 65536 // (num_warps * -(-registers * 32 // 256) * 256)
    by_smem = 227 * 1024 // (shared + 1024)
    return min(by_regs, by_smem, 32, 64 // num_warps)


def _descriptors(bits: int, D: int, rule: dict) -> dict:
    """tensor_core's descriptor arguments: with ``tma``, their types (``tensor_core.boxes``), else ``None``."""
    names = {"main": ("k_desc", "v_desc"), "low": ("k_low_desc", "v_low_desc")}
    out = dict.fromkeys(names["main"] + names["low"])
    if rule.get("tma"):
        for name, (dtype, box) in tensor_core.boxes(bits, D, rule["tile"], rule["tma"]).items():
            ty = {torch.int16: "i16", torch.int8: "i8"}[dtype]
            out.update(dict.fromkeys(names[name], f"tensordesc<{ty}[{box[0]}, {box[1]}]>"))
    return out


def count(path: str, bits: int, G: int, D: int, rule: dict, arch: int) -> dict:
    kernel, extra = PATHS[path]
    const = constants(path, bits, G, D, rule)
    args = ARGS + extra
    descs = _descriptors(bits, D, rule) if path == "tensor_core" else {}
    const.update({a: None for a, t in descs.items() if t is None})
    sig = {a: descs.get(a) or _sig(a) for a in args if a not in const}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(args) if a.endswith("_ptr")}
    src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=aligned)
    options = dict(num_warps=rule["num_warps"], num_stages=rule["num_stages"])
    if rule.get("maxnreg"):
        options["maxnreg"] = rule["maxnreg"]
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(k.asm["cubin"])
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    loop = main_loop(sass)
    ops = collections.Counter(opcode(x) for x in loop)
    per_tile = sum(ops.values())
    codes = rule["tile"] * 2 * D
    knobs = {k: rule.get(k) for k in ("tile", "num_warps", "num_stages", "maxnreg", "min_rows", "vec", "fields")}
    if path == "tensor_core":
        knobs.update(min_rows=rule.get("min_rows", 16), m_axis=rule.get("m_axis", "group"),
                     inline_table=rule.get("inline_table", 0), tma=int(rule.get("tma") or 0),
                     **({"qk_regs": True} if rule.get("qk_regs") else {}))
    return dict(path=path, arch=f"sm_{arch}", bits=bits, G=G, head_dim=D, **knobs, aligned=True,
                registers=regs, spill_stack_bytes=stack, shared_bytes=k.metadata.shared,
                programs_per_sm=programs_per_sm(regs, k.metadata.shared, rule["num_warps"]),
                warp_instr_per_tile=per_tile,
                thread_instr_per_code=round(per_tile * rule["num_warps"] * 32 / codes, 2),
                by_kind={kind: sum(ops[o] for o in names) for kind, names in KINDS.items()},
                register_copies=sum(1 for x in loop if opcode(x) == "MOV" or "IMAD.MOV" in x),
                top=dict(ops.most_common(12)), triton=triton.__version__)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--gpu", default="NVIDIA H200", help="whose tuning rules give the launch parameters")
    p.add_argument("--out", type=Path, default=RESULTS / "kernel_sass.json")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--min-rows", nargs="+", type=int, help="tensor_core: the launch's min_rows, each counted "
                   "(default: the rule's); e.g. 16 1 compares the padded query rows with the exact ones")
    p.add_argument("--m-axis", nargs="+", choices=tensor_core.M_AXES, help="tensor_core: what the dots' M holds, "
                   "each counted (default: the rule's)")
    p.add_argument("--num-warps", nargs="+", type=int, help="tensor_core: each counted (default: the rule's)")
    p.add_argument("--tma", nargs="+", type=int, help="tensor_core: the codes through descriptors, that many tokens "
                   "a copy row (1, 2, 4, 8), or pointers (0), each counted (default: the rule's)")
    args = p.parse_args(argv)
    rows = []
    for G in GROUPS.values():
        for bits, rule in {(bits, json.dumps(rule)): (bits, rule) for bits in args.bits for batch in BATCHES
                           for rule in tuning.rules(args.gpu, G, bits, bits, 128, batch=batch)[:1]}.values():
            path = rule["path"]  # the launch the dispatcher picks at each batch, counted once
            if path not in args.paths:
                continue
            tc = path == "tensor_core"
            for min_rows, m_axis, warps, tma in itertools.product(
                    args.min_rows if tc and args.min_rows else [rule.get("min_rows", 16) if tc else None],
                    args.m_axis if tc and args.m_axis else [rule.get("m_axis", "group")],
                    args.num_warps if tc and args.num_warps else [rule["num_warps"]],
                    args.tma if tc and args.tma else [rule.get("tma", 0)]):
                launch = {**rule, "min_rows": min_rows, "m_axis": m_axis, "num_warps": warps, "tma": tma}
                rows.append(count(path, bits, G, 128, launch, args.arch))
                r = rows[-1]
                print(f"{path} G={G} {bits}-bit tile {r['tile']} x {r['num_warps']} warps, min_rows {r['min_rows']}, "
                      f"M {r.get('m_axis')}: "
                      f"{r['warp_instr_per_tile']} warp instructions per tile, {r['thread_instr_per_code']} per code, "
                      f"{r['registers']} registers, {r['spill_stack_bytes']} B spill stack; {r['by_kind']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
