"""A `vsteer serve` SIGKILLed while uploads (whole and chunked) and deletes are in flight leaves
no partial vector in its store, and no process it started: its orphaned engine core stops itself. Its own module, so that its server never runs beside
tenant_server/test_edge.py's."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import torch

from tests.server.tenant_server.test_edge import _check_store, _start
from vsteer import SteeringVector, save_vector


def test_sigkill_during_uploads_leaves_no_partial_vector(model_path, tmp_path):
    store = tmp_path / "store"
    proc, base = _start(model_path, tmp_path / "server.log", store, max_model_len=256)
    engine_procs: list = []
    try:
        payloads = []
        for i in range(8):
            v = SteeringVector.from_tensors({layer: torch.randn(576) for layer in range(30)})  # ~70 KB each
            save_vector(v, tmp_path / f"{i}.safetensors")
            payloads.append((tmp_path / f"{i}.safetensors").read_bytes())

        def slow_body(data: bytes):
            for k in range(0, len(data), 8192):
                yield data[k:k + 8192]
                time.sleep(0.01)

        def uploader(n: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                for j in range(100):
                    data = payloads[(n + j) % len(payloads)]
                    try:
                        c.post("/v1/vectors", params={"name": f"v{n}"},
                               content=slow_body(data) if j % 2 else data)
                        c.delete(f"/v1/vectors/v{n}")
                    except httpx.HTTPError:
                        return

        threads = [threading.Thread(target=uploader, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(3.0)  # uploads (whole and chunked) and deletes are in flight
        import psutil

        engine_procs = psutil.Process(proc.pid).children(recursive=True)
        assert any("EngineCore" in p.name() for p in engine_procs), [p.name() for p in engine_procs]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # the engine core (vsteer.engine.lifetime) and, with it, its workers stop once orphaned
        _, alive = psutil.wait_procs(engine_procs, timeout=45)
        for t in threads:
            t.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in engine_procs:  # never leak them, whatever failed
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode == -signal.SIGKILL
    assert not alive, f"processes the killed server started outlived it: {[(p.pid, p.name()) for p in alive]}"
    _check_store(store)
    assert len(list(store.glob("*.safetensors"))) >= 1 or (store / "names.json").exists()  # uploads did happen
