"""Check that a vLLM release has every class, method and attribute vsteer's engine uses.

Usage: ``python scripts/check_vllm_api.py 0.34.0 [0.33.0 ...] [--wheels DIR] [--json OUT]``.
Each version's wheel is downloaded without its dependencies (``pip download --no-deps``; a wheel
already in ``--wheels`` is reused) and read, not installed or imported: its Python files are parsed
and each requirement below is looked up in the class that defines it or in one of its bases
(methods with the parameters vsteer passes, attributes as class fields or ``self.x = ...``).
Groups: the Model Runner V2 adapter (``vsteer/engine/runner_v2.py``), the V1 adapter (reported as
"removed" where vLLM has no V1 runner, from 0.34 on), the scheduler, the two plugin entry points (``vllm.general_plugins`` wraps
``EngineArgs.create_engine_config``; ``vllm.endpoint_plugins`` attaches the edge) and the server edge. Exit
status 1 if anything a version needs is missing.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

V2 = "vllm/v1/worker/gpu/model_runner.py"
V1 = "vllm/v1/worker/gpu_model_runner.py"
SCHED = "vllm/v1/core/sched/scheduler.py"

#: group -> [(file, class, member, kind, leading parameters after self)]; "a|b": a where vLLM has it,
#: else b (vsteer reads the first that exists)
REQUIREMENTS: dict[str, list[tuple[str, str, str, str, tuple[str, ...]]]] = {
    "runner V2": [
        (V2, "GPUModelRunner", "load_model", "method", ()),
        (V2, "GPUModelRunner", "get_model", "method", ()),
        (V2, "GPUModelRunner", "add_requests", "method", ("scheduler_output",)),
        (V2, "GPUModelRunner", "finish_requests", "method", ("scheduler_output",)),
        (V2, "GPUModelRunner", "update_requests", "method", ("scheduler_output",)),
        (V2, "GPUModelRunner", "prepare_inputs", "method", ("scheduler_output",)),
        (V2, "GPUModelRunner", "execute_model", "method", ("scheduler_output",)),
        (V2, "GPUModelRunner", "sample_tokens", "method", ("grammar_output",)),
        (V2, "GPUModelRunner", "_init_kv_zero_meta", "method", ()),
        (V2, "GPUModelRunner", "kv_block_zeroer", "attr", ()),
        (V2, "GPUModelRunner", "execute_model_state", "attr", ()),
        (V2, "GPUModelRunner", "vllm_config", "attr", ()),
        (V2, "GPUModelRunner", "model_config", "attr", ()),
        (V2, "GPUModelRunner", "scheduler_config", "attr", ()),
        (V2, "GPUModelRunner", "compilation_config", "attr", ()),
        (V2, "GPUModelRunner", "device", "attr", ()),
        (V2, "ExecuteModelState", "hidden_states", "attr", ()),
        ("vllm/v1/worker/gpu/input_batch.py", "InputBatch", "req_ids", "attr", ()),
        ("vllm/v1/worker/gpu/input_batch.py", "InputBatch", "num_scheduled_tokens", "attr", ()),
        ("vllm/v1/worker/gpu/input_batch.py", "InputBatch", "num_computed_tokens_np", "attr", ()),
        ("vllm/v1/worker/gpu/async_utils.py", "AsyncOutput", "model_runner_output", "attr", ()),
        ("vllm/v1/worker/cpu/model_runner.py", "CPUModelRunner", "load_model", "method", ()),
    ],
    "runner V1": [
        (V1, "GPUModelRunner", "_update_states", "method", ("scheduler_output",)),
        (V1, "GPUModelRunner", "_prepare_inputs", "method", ("scheduler_output", "num_scheduled_tokens")),
        (V1, "GPUModelRunner", "execute_model", "method", ("scheduler_output",)),
        (V1, "GPUModelRunner", "sample_tokens", "method", ("grammar_output",)),
        (V1, "GPUModelRunner", "_zero_block_ids", "method", ("block_ids",)),
        (V1, "GPUModelRunner", "_init_kv_zero_meta", "method", ()),
        (V1, "GPUModelRunner", "requests", "attr", ()),
        (V1, "GPUModelRunner", "input_batch", "attr", ()),
        (V1, "GPUModelRunner", "execute_model_state", "attr", ()),
        (V1, "GPUModelRunner", "_bookkeeping_sync", "method", ("scheduler_output",)),
        (V1, "GPUModelRunner", "discard_request_mask", "attr", ()),
        (V1, "ExecuteModelState", "hidden_states", "attr", ()),
        (V1, "ExecuteModelState", "logits", "attr", ()),
        ("vllm/v1/worker/gpu_input_batch.py", "InputBatch", "req_ids", "attr", ()),
        ("vllm/v1/worker/gpu_input_batch.py", "InputBatch", "num_computed_tokens_cpu", "attr", ()),
        ("vllm/v1/worker/gpu_input_batch.py", "InputBatch", "generators", "attr", ()),
        ("vllm/v1/worker/gpu_input_batch.py", "InputBatch", "num_reqs", "attr", ()),
    ],
    "scheduler": [
        (SCHED, "Scheduler", "add_request", "method", ("request",)),
        (SCHED, "Scheduler", "schedule", "method", ()),
        (SCHED, "Scheduler", "update_from_output", "method", ("scheduler_output", "model_runner_output")),
        (SCHED, "Scheduler", "_free_request", "method", ("request",)),
        (SCHED, "Scheduler", "_handle_blocked_waiting_request", "method", ("request",)),
        (SCHED, "Scheduler", "_get_new_block_ids_to_zero", "method", ()),
        (SCHED, "Scheduler", "grammar_compile_error_reqs", "attr", ()),
        (SCHED, "Scheduler", "structured_output_manager", "attr", ()),
        ("vllm/v1/structured_output/__init__.py", "StructuredOutputManager", "accept_tokens", "method",
         ("request", "new_token_ids")),
        (SCHED, "Scheduler", "kv_cache_manager", "attr", ()),
        (SCHED, "Scheduler", "kv_cache_config", "attr", ()),
        (SCHED, "Scheduler", "running", "attr", ()),
        (SCHED, "Scheduler", "requests", "attr", ()),
        ("vllm/v1/core/sched/async_scheduler.py", "AsyncScheduler", "_update_after_schedule", "method", ()),
        ("vllm/v1/core/kv_cache_manager.py", "KVCacheManager", "get_block_ids", "method", ("request_id",)),
        ("vllm/v1/core/kv_cache_manager.py", "KVCacheManager", "block_pool", "attr", ()),
        ("vllm/v1/core/block_pool.py", "BlockPool", "evict_blocks", "method", ("block_ids",)),
        ("vllm/v1/core/block_pool.py", "BlockPool", "null_block", "attr", ()),
        ("vllm/v1/core/sched/output.py", "SchedulerOutput", "finished_req_ids", "attr", ()),
        ("vllm/v1/core/sched/output.py", "SchedulerOutput", "scheduled_new_reqs", "attr", ()),
        ("vllm/v1/core/sched/output.py", "SchedulerOutput", "new_block_ids_to_zero", "attr", ()),
        ("vllm/v1/core/sched/output.py", "NewRequestData", "req_id", "attr", ()),
        ("vllm/v1/core/sched/output.py", "NewRequestData", "prompt_len", "attr", ()),
        ("vllm/v1/core/sched/output.py", "NewRequestData", "sampling_params", "attr", ()),
        ("vllm/v1/outputs.py", "ModelRunnerOutput", "num_nans_in_logits", "attr", ()),
        ("vllm/v1/outputs.py", "ModelRunnerOutput", "req_id_to_index|req_ids", "attr", ()),
        ("vllm/v1/outputs.py", "ModelRunnerOutput", "sampled_token_ids", "attr", ()),
        ("vllm/v1/outputs.py", "ModelRunnerOutput", "prompt_logprobs_dict", "attr", ()),
        ("vllm/v1/request.py", "Request", "num_computed_tokens", "attr", ()),
        ("vllm/v1/request.py", "Request", "num_in_flight_tokens", "attr", ()),
        ("vllm/v1/request.py", "Request", "num_prompt_tokens", "attr", ()),
        ("vllm/v1/request.py", "Request", "cache_salt", "attr", ()),
        ("vllm/v1/request.py", "Request", "block_hashes", "attr", ()),
        ("vllm/v1/request.py", "Request", "resumable", "attr", ()),
        ("vllm/v1/request.py", "Request", "skip_reading_prefix_cache|prefix_cache_hit_limit", "attr", ()),
        ("vllm/v1/request.py", "Request", "update_block_hashes", "method", ()),
        ("vllm/v1/request.py", "Request", "is_finished", "method", ()),
        ("vllm/v1/request.py", "Request", "get_finished_reason", "method", ()),
        ("vllm/v1/engine/__init__.py", "EngineCoreOutput", "stop_reason", "attr", ()),
        ("vllm/v1/engine/__init__.py", "EngineCoreOutput", "finish_reason", "attr", ()),
        ("vllm/v1/engine/__init__.py", "FinishReason", "ERROR", "attr", ()),
        ("vllm/v1/worker/cpu_worker.py", "CPUWorker", "load_model", "method", ()),
        ("vllm/v1/worker/gpu_worker.py", "Worker", "load_model", "method", ()),
    ],
    "plugins": [
        ("vllm/engine/arg_utils.py", "EngineArgs", "create_engine_config", "method", ("usage_context",)),
        ("vllm/engine/arg_utils.py", "EngineArgs", "model", "attr", ()),
        ("vllm/engine/arg_utils.py", "EngineArgs", "additional_config", "attr", ()),
        ("vllm/engine/arg_utils.py", "EngineArgs", "worker_cls", "attr", ()),
        ("vllm/engine/arg_utils.py", "EngineArgs", "scheduler_cls", "attr", ()),
        ("vllm/config/scheduler.py", "SchedulerConfig", "scheduler_cls", "attr", ()),
        ("vllm/config/scheduler.py", "SchedulerConfig", "async_scheduling", "attr", ()),
        ("vllm/config/parallel.py", "ParallelConfig", "worker_cls", "attr", ()),
        ("vllm/usage/usage_lib.py", "UsageContext", "OPENAI_API_SERVER", "attr", ()),
        ("vllm/plugins/endpoint_plugins/interface.py", "EndpointPlugin", "name", "attr", ()),
        ("vllm/plugins/endpoint_plugins/interface.py", "EndpointPlugin", "required_tasks", "attr", ()),
        ("vllm/plugins/endpoint_plugins/interface.py", "EndpointPlugin", "attach_router", "method", ("app",)),
        ("vllm/plugins/endpoint_plugins/interface.py", "EndpointPlugin", "init_state",
         "method", ("engine_client", "state", "args")),
    ],
    "server edge": [
        ("vllm/exceptions.py", "VLLMValidationError", "__init__", "method", ("message",)),
        ("vllm/exceptions.py", "VLLMUnprocessableEntityError", "__init__", "method", ("message",)),
        ("vllm/exceptions.py", "GenerationError", "__init__", "method", ("message",)),
    ],
}


@dataclass
class _Class:
    file: str
    node: ast.ClassDef
    imports: dict[str, str]  # name -> module it is imported from
    methods: dict[str, list[str]] = field(default_factory=dict)
    attrs: set[str] = field(default_factory=set)


class Wheel:
    """The parsed Python files of a vLLM wheel (``vllm/``), indexed by file and class name."""

    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._files: dict[str, dict[str, _Class]] = {}

    def has(self, file: str) -> bool:
        return file in self.names

    def classes(self, file: str) -> dict[str, _Class]:
        if file not in self._files:
            self._files[file] = _parse(file, self.zip.read(file).decode()) if file in self.names else {}
        return self._files[file]

    def lookup(self, file: str, cls: str, member: str, depth: int = 0) -> tuple[str, list[str] | None] | None:
        """(the class that defines ``member``, its parameters or None for an attribute), searching bases."""
        c = self.classes(file).get(cls)
        if c is None or depth > 12:
            return None
        if member in c.methods:
            return f"{file}:{cls}", c.methods[member]
        if member in c.attrs:
            return f"{file}:{cls}", None
        for base in c.node.bases:
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            if name is None:
                continue
            module = c.imports.get(name)
            base_file = _module_file(module) if module else file
            found = self.lookup(base_file, name, member, depth + 1)
            if found is None and module:  # a package re-export: vllm/x/__init__.py
                found = self.lookup(base_file.replace(".py", "/__init__.py"), name, member, depth + 1)
            if found is not None:
                return found
        return None


def _module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def _parse(file: str, source: str) -> dict[str, _Class]:
    tree = ast.parse(source)
    imports = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                imports[alias.asname or alias.name] = node.module
    out = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        c = _Class(file, node, imports)
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [a.arg for a in item.args.posonlyargs + item.args.args + item.args.kwonlyargs]
                c.methods[item.name] = args
                if any(isinstance(d, ast.Name) and d.id in ("property", "cached_property") for d in item.decorator_list):
                    c.attrs.add(item.name)
                for sub in ast.walk(item):
                    targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(sub, ast.AnnAssign) else []
                    for t in targets:
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            c.attrs.add(t.attr)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                c.attrs.add(item.target.id)
            elif isinstance(item, ast.Assign):
                c.attrs.update(t.id for t in item.targets if isinstance(t, ast.Name))
        out[node.name] = c
    return out


def check(wheel: Wheel) -> dict[str, list[dict]]:
    """Every requirement's result, by group."""
    results: dict[str, list[dict]] = {}
    for group, reqs in REQUIREMENTS.items():
        rows = []
        removed = group == "runner V1" and not wheel.has(V1)
        for file, cls, member, kind, params in reqs:
            row = {"file": file, "class": cls, "member": member, "kind": kind}
            if removed:
                row["status"] = "removed"
            else:
                found = next(filter(None, (wheel.lookup(file, cls, m) for m in member.split("|"))), None)
                if found is None:
                    row["status"] = "missing"
                else:
                    row["defined_in"], args = found
                    if kind == "method" and args is None:
                        row["status"] = "not a method"
                    elif kind == "method" and args[1 : 1 + len(params)] != list(params):
                        row["status"] = f"parameters {args[1:]} (expected to start with {list(params)})"
                    else:
                        row["status"] = "ok"
            rows.append(row)
        results[group] = rows
    return results


def wheel_for(version: str, folder: Path) -> Path:
    """The vLLM wheel of ``version`` in ``folder``, downloaded there (no dependencies) if absent."""
    found = sorted(folder.glob(f"vllm-{version}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary",
                        ":all:", "-d", str(folder), "-q"], check=True)
        found = sorted(folder.glob(f"vllm-{version}-*.whl"))
    if not found:
        raise SystemExit(f"no wheel for vllm {version} in {folder}")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="vLLM versions, e.g. 0.32.0 0.33.0 0.34.0")
    parser.add_argument("--wheels", type=Path, default=Path(".cache/vllm-wheels"), help="where wheels are kept")
    parser.add_argument("--json", type=Path, help="write every result here")
    args = parser.parse_args(argv)
    report, failed = {}, False
    for version in args.versions:
        results = check(Wheel(wheel_for(version, args.wheels)))
        report[version] = results
        print(f"vllm {version}")
        for group, rows in results.items():
            bad = [r for r in rows if r["status"] not in ("ok", "removed")]
            status = "removed" if rows and all(r["status"] == "removed" for r in rows) else \
                f"{len(rows) - len(bad)}/{len(rows)} ok"
            print(f"  {group}: {status}")
            for r in bad:
                print(f"    {r['class']}.{r['member']} ({r['file']}): {r['status']}")
            failed |= bool(bad)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
