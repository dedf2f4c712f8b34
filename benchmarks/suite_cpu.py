"""Where the test suite's CPU time goes: the pytest workers' own work vs the processes they start.

Runs the suite (``make test``'s command by default) while reading ``/proc`` every ``--interval``
seconds, and sorts every process under it into a kind (pytest process, ``vsteer`` command,
``vsteer serve``, vLLM engine core or tensor-parallel worker, Ray, other). Each process's CPU is its last reading of
user+system time, so a process shorter than one interval is missed (its CPU is counted nowhere).

    python benchmarks/suite_cpu.py                       # make test's command, ~13 min on 2 cores
    python benchmarks/suite_cpu.py -- -m "not compiled"  # extra pytest arguments after --
    # an AVX2-only CPU, emulated on an AVX-512 one (same clock and cores, kernels kept to AVX2):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/suite_cpu.py --tag avx2

Writes ``results/suite-cpu[-TAG].{json,png,log}`` (the log is pytest's output) and a section of
``RESULTS.md``. Linux only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_description, publish  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("pytest process", "vsteer command", "vsteer serve", "vLLM engine core", "Ray", "other")


def kind_of(cmdline: list[str]) -> str:
    """The kind of a process, from its command line (or the title pytest-xdist gives its workers)."""
    line = " ".join(cmdline)
    if line.startswith("[pytest-xdist") or "exec(eval(" in line or "pytest" in cmdline[1:3]:
        return "pytest process"
    if "ray::" in line or "raylet" in line or "gcs_server" in line or "/ray/" in line:
        return "Ray"
    if "multiprocessing.spawn" in line or line.startswith("VLLM::"):  # EngineCore, Worker_TP<n>
        return "vLLM engine core"
    if "vsteer.cli" in line or any(Path(w).name == "vsteer" for w in cmdline[:2]):
        return "vsteer serve" if "serve" in cmdline else "vsteer command"
    return "other"


def _read(pid: int) -> tuple[int, float, list[str]] | None:
    """(parent pid, CPU seconds, command line) of ``pid``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK, [c.decode(errors="replace") for c in cmd if c]


def _descendants(root: int) -> dict[int, tuple[int, float, list[str]]]:
    procs = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (info := _read(int(entry.name))) is not None:
            procs[int(entry.name)] = info
    children = defaultdict(list)
    for pid, (ppid, _, _) in procs.items():
        children[ppid].append(pid)
    found, todo = ({root: procs[root]} if root in procs else {}), [root]
    while todo:
        pid = todo.pop()
        for child in children[pid]:
            found[child] = procs[child]
            todo.append(child)
    return found


def vllm_import_cpu(repeats: int = 2) -> float:
    """CPU seconds (user+system) a fresh interpreter spends importing vLLM's engine, fewest of ``repeats``."""
    import resource

    code = "from vllm import LLM; import vllm.v1.engine.llm_engine"
    best = float("inf")
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between readings of /proc")
    ap.add_argument("--tag", default="", help="names a run kept apart from the default one (its files and section)")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args()
    stem = "suite-cpu" + (f"-{args.tag}" if args.tag else "")

    command = ["bash", "scripts/test.sh", "-n", "2", "--no-loadscope-reorder", "-q", *args.pytest_args]
    start = time.monotonic()
    log = RESULTS / f"{stem}.log"  # pytest's own output
    RESULTS.mkdir(parents=True, exist_ok=True)
    seen: dict[int, dict] = {}
    timeline: list[tuple[float, dict[str, float]]] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            time.sleep(args.interval)
            now = time.monotonic() - start
            for pid, (ppid, cpu, cmd) in _descendants(proc.pid).items():
                rec = seen.setdefault(pid, {"pid": pid, "ppid": ppid, "start_s": round(now, 1), "cmd": cmd[:12],
                                            "kind": kind_of(cmd)})
                if cmd and rec["cmd"] != cmd[:12] and rec["kind"] != "pytest process":  # exec'd since (bash -c -> python)
                    rec.update(cmd=cmd[:12], kind=kind_of(cmd))
                rec["cpu_s"] = cpu
                rec["end_s"] = round(now, 1)
            totals = defaultdict(float)
            for rec in seen.values():
                totals[rec["kind"]] += rec.get("cpu_s", 0.0)
            timeline.append((now, dict(totals)))
    print(log.read_text()[-3000:])
    wall = time.monotonic() - start
    by_kind = {k: {"processes": 0, "cpu_s": 0.0} for k in KINDS}
    for rec in seen.values():
        by_kind[rec["kind"]]["processes"] += 1
        by_kind[rec["kind"]]["cpu_s"] += rec.get("cpu_s", 0.0)
    total_cpu = sum(v["cpu_s"] for v in by_kind.values())
    # the processes that paid for importing vLLM: every one that used at least 3/4 of what the import costs
    import_cpu = vllm_import_cpu()
    importers = [r for r in seen.values() if r["kind"] != "pytest process" and r.get("cpu_s", 0) >= 0.75 * import_cpu]
    spared = total_cpu - len(importers) * import_cpu
    cores = os.cpu_count() or 1
    machine = cpu_description()
    _plot(timeline, RESULTS / f"{stem}.png", machine)
    data = {"pytest_exit": proc.returncode, "wall_s": round(wall, 1), "cpu_s": round(total_cpu, 1), "by_kind": by_kind,
            "vllm_import_cpu_s": round(import_cpu, 2), "processes_importing_vllm": len(importers),
            "cpu_s_without_those_imports": round(spared, 1),
            "processes": sorted(seen.values(), key=lambda r: r["start_s"])}
    body = [f"`{' '.join(command)}` (exit {proc.returncode}) took {wall / 60:.1f} min of wall time and "
            f"{total_cpu / 60:.1f} CPU-min ({total_cpu / wall:.2f} cores busy on average). Each process's CPU is its "
            f"user+system time read from /proc every {args.interval} s.", "",
            "| kind | processes | CPU min | share | CPU s per process |", "|---|---:|---:|---:|---:|"]
    for k, v in by_kind.items():
        body.append(f"| {k} | {v['processes']} | {v['cpu_s'] / 60:.1f} | {v['cpu_s'] / max(total_cpu, 1e-9):.0%} | "
                    f"{v['cpu_s'] / max(v['processes'], 1):.1f} |")
    body += ["", f"Importing vLLM's engine costs a fresh interpreter {import_cpu:.1f} CPU-s here. "
             f"{len(importers)} started processes used at least three quarters of that (the `vsteer` commands and "
             f"servers that build an engine, vLLM's engine-core and tensor-parallel workers, Ray's engine actors). "
             f"Without those imports the suite would still need {spared / 60:.1f} CPU-min: at least "
             f"{spared / 60 / cores:.1f} min of wall time on {cores} cores.", "",
             f"![suite CPU by kind](results/{stem}.png)", ""]
    title = "## Test suite" + (f" ({args.tag})" if args.tag else "") + ": CPU by kind of process"
    publish(title, RESULTS / f"{stem}.json", data, body, machine=machine)
    print("\n".join(body))
    sys.exit(proc.returncode)


def _plot(timeline: list[tuple[float, dict[str, float]]], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # busy cores per kind in 10 s bins (a process first seen late brings its CPU so far into one reading)
    width, ends, busy = 10.0, [], {k: [] for k in KINDS}
    last_t, last = 0.0, {}
    for i, (t, totals) in enumerate(timeline):
        if t - last_t >= width or i == len(timeline) - 1:
            for k in KINDS:
                busy[k].append(max(totals.get(k, 0.0) - last.get(k, 0.0), 0.0) / (t - last_t))
            ends.append(t)
            last_t, last = t, totals
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.stackplot([t / 60 for t in ends], *[busy[k] for k in KINDS], labels=KINDS, step="pre")
    ax.set(xlabel="minutes into the run", ylabel="cores busy", title=f"test suite: CPU by kind of process ({machine})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
