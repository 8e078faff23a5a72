#!/usr/bin/env python3
"""Assemble every kernel's PTX for sm_80 and sm_90 (sm_90 only for PTX made for it) with `ptxas -v` and check the resources it reports.

    python3 scripts/ptxas_report.py PTX_DIR [--check]

Writes kernels/ptxas-report.txt (one line per kernel and architecture: registers, stack frame, spills),
which is kept in the repository so that a change in register use shows up in review. Fails when a kernel
spills, has a stack frame, or uses more registers than its budget. With --check it also fails when the
freshly made report differs from the committed one (run it without --check to update the file).

ptxas is taken from $PTXAS, else from the nvidia-cuda-nvcc-cu12 wheel importable by this Python, else
from PATH.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ARCHS = ["sm_80", "sm_90"]
# At most 64 registers per thread: 256-thread blocks then fit 4 per SM (1024 threads), enough to keep
# these memory-bound kernels' loads and stores in flight.
REGISTER_BUDGET = {"default": 64}
REPORT = Path(__file__).resolve().parent.parent / "kernels" / "ptxas-report.txt"


def find_ptxas():
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    try:
        import nvidia.cuda_nvcc as m

        candidate = Path(list(m.__path__)[0]) / "bin" / "ptxas"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if not found:
        sys.exit("ptxas not found: pip install nvidia-cuda-nvcc-cu12, or set PTXAS")
    return found


def assemble(ptxas, ptx, arch):
    out = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"ptxas failed on {ptx} for {arch}:\n{out.stderr}")
    kernels = {}
    current = None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return kernels


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    ptx_dir = Path(sys.argv[1])
    check = "--check" in sys.argv[2:]
    ptxas = find_ptxas()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lines = [f"# ptxas -v report ({version}); regenerate: python3 scripts/ptxas_report.py PTX_DIR"]
    problems = []
    ptx_files = sorted(ptx_dir.glob("*.ptx"))
    if not ptx_files:
        sys.exit(f"no .ptx files in {ptx_dir}")
    for ptx in ptx_files:
        # A family made for a newer architecture (thread-block clusters: sm_90) is assembled for it only.
        target = re.search(r"^\.target sm_(\d+)", ptx.read_text(), re.M)
        minimum = int(target.group(1)) if target else 0
        for arch in [a for a in ARCHS if int(a[3:]) >= minimum]:
            for name, r in sorted(assemble(ptxas, ptx, arch).items()):
                budget = REGISTER_BUDGET.get(name, REGISTER_BUDGET["default"])
                lines.append(
                    f"{ptx.stem:<12} {arch}  {name:<28} registers {r['registers']:>3} (budget {budget})  "
                    f"stack {r['stack']}  spill stores {r['spill_stores']}  spill loads {r['spill_loads']}"
                )
                if r["stack"] or r["spill_stores"] or r["spill_loads"]:
                    problems.append(f"{name} on {arch} spills or has a stack frame")
                if r["registers"] > budget:
                    problems.append(f"{name} on {arch} uses {r['registers']} registers (budget {budget})")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if check:
        committed = REPORT.read_text() if REPORT.exists() else ""
        if committed != report:
            problems.append(f"{REPORT} is out of date: run python3 scripts/ptxas_report.py {ptx_dir} and commit it")
    else:
        REPORT.write_text(report)
    if problems:
        sys.exit("ptxas check failed:\n  " + "\n  ".join(problems))
    print("ptxas check passed: no spills, no stack frames, registers within budget")


if __name__ == "__main__":
    main()
