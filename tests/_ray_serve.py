"""`serve run deploy/serve_config.yaml` on a private Ray cluster on loopback (tests and benchmarks).

The config is the repository's, with a free HTTP port; the cluster's metrics export port is free
too. Each reply of the app names its replica (``vsteer-replica``), which is how callers wait for
replicas and tell them apart.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from vsteer.server.process import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class RayServe:
    base: str
    metrics_url: str
    proc: subprocess.Popen
    log: Path
    env: dict

    def wait_for_replicas(self, count: int, timeout: float, headers: dict) -> set[str]:
        """Wait until ``count`` distinct replicas have answered ``GET /v1/models``; returns their ids."""
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve run exited:\n{self.log.read_text()[-3000:]}")
            log = self.log.read_text()
            if log.count("initialize_and_get_metadata") >= 2:  # Ray Serve would retry forever
                raise AssertionError(f"replicas fail to start:\n{log[log.index('initialize_and_get_metadata'):][:4000]}")
            try:
                r = httpx.get(self.base + "/v1/models", headers=headers, timeout=10)
                if r.status_code == 200:
                    seen.add(r.headers["vsteer-replica"])
                    if len(seen) >= count:
                        return seen
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{len(seen)} of {count} replicas answered:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop `serve run` and the cluster, and every engine its replicas started (an engine
        outliving its replica would hold its memory)."""
        engines = replica_engines()
        self.proc.kill()
        self.proc.wait(60)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        for engine in engines + replica_engines():
            try:
                engine.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass


def start_ray_serve(root: Path, env: dict, *, cpus: int = 2, kv_bytes: int = 256 * 2**20) -> RayServe:
    """Start a head node on 127.0.0.1 (its workers get ``env``) and ``serve run`` the repository's
    config against it, each replica's KV cache ``kv_bytes``. Returns at once; call
    :meth:`RayServe.wait_for_replicas`."""
    port, gcs, metrics = free_port(), free_port(), free_port()
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    del app["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"]  # whole GiB only; it would override the bytes
    app["args"]["vllm_args"] += ["--kv-cache-memory-bytes", str(kv_bytes)]
    (root / "serve_config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in env.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_metrics_report_interval_ms": "1000"}
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus",
             str(cpus), "--include-dashboard", "false", "--metrics-export-port", str(metrics), "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    log = root / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", f"127.0.0.1:{gcs}", str(root / "serve_config.yaml")],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=root)
    return RayServe(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics", proc, log, env)


def replica_engines() -> list:
    """The vLLM engine-core processes of Ray Serve replicas on this machine (psutil processes)."""
    return [p for p, parents in _engine_cores() if any("ServeReplica" in title for title in parents)]


def wait_for_replica_engines(n: int, timeout: float = 60) -> list:
    """:func:`replica_engines` once it finds ``n`` (a replica may still be starting its engine);
    after ``timeout`` an AssertionError lists every engine-core process and its parents' titles."""
    deadline = time.monotonic() + timeout
    while len(engines := replica_engines()) != n and time.monotonic() < deadline:
        time.sleep(1)
    assert len(engines) == n, [(p.pid, parents) for p, parents in _engine_cores()]
    return engines


def _engine_cores() -> list:
    """(process, its parents' command lines) of every vLLM engine-core process on this machine."""
    import psutil

    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        # vLLM sets the title with setproctitle where it can, else only the kernel's process name
        # (seen here: one replica's engine kept its multiprocessing command line)
        if "EngineCore" not in (p.info["name"] or "") + " ".join(p.info["cmdline"] or []):
            continue
        try:
            found.append((p, [" ".join(parent.cmdline()) for parent in p.parents()]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
