"""Ray Serve application: N ``vsteer serve`` replicas behind one HTTP endpoint.

Each replica starts one ``vsteer serve`` process (vLLM's OpenAI server with the vsteer worker)
on a local port of its node and forwards requests to it, streaming included. Ray Serve spreads
requests over the replicas; every replica reads the same vector store (a shared volume), so a
vector uploaded through any replica is usable on all of them.

Run locally:   serve run deploy.ray_serve_app:app            (RAY_SERVE_ARGS as below)
On KubeRay:    see deploy/kuberay/rayservice.yaml and deploy/README.md.

Settings come from the environment: ``VSTEER_SERVE_ARGS`` (arguments of ``vsteer serve``, e.g.
"smollm2 --enforce-eager --max-slots 64"), ``VSTEER_VECTOR_STORE`` (the shared store),
``VSTEER_REPLICAS`` (default 1), ``VSTEER_GPUS_PER_REPLICA`` (default 1 if CUDA else 0).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from vsteer.server.process import free_port, wait_until_healthy

_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}


class VsteerReplica:
    """One ``vsteer serve`` process per replica, proxied."""

    def __init__(self) -> None:
        self.port = free_port()
        args = shlex.split(os.environ.get("VSTEER_SERVE_ARGS", "smollm2"))
        self.proc = subprocess.Popen([sys.executable, "-m", "vsteer.cli", "serve", *args,
                                      "--host", "127.0.0.1", "--port", str(self.port)])
        wait_until_healthy(f"http://127.0.0.1:{self.port}", self.proc,
                           timeout=float(os.environ.get("VSTEER_START_TIMEOUT", "900")))
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=None)

    async def __call__(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        upstream = self.client.build_request(request.method, request.url.path, params=request.query_params,
                                             headers=headers, content=await request.body())
        response = await self.client.send(upstream, stream=True)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(response.aiter_raw(), status_code=response.status_code, headers=out_headers,
                                     background=None)
        body = await response.aread()
        await response.aclose()
        return Response(body, status_code=response.status_code, headers=out_headers)

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.terminate()


def build_app():
    gpus = float(os.environ.get("VSTEER_GPUS_PER_REPLICA", "0"))
    deployment = serve.deployment(
        VsteerReplica,
        name="vsteer",
        num_replicas=int(os.environ.get("VSTEER_REPLICAS", "1")),
        ray_actor_options={"num_gpus": gpus, "num_cpus": float(os.environ.get("VSTEER_CPUS_PER_REPLICA", "1"))},
        max_ongoing_requests=int(os.environ.get("VSTEER_MAX_ONGOING", "256")),
        health_check_timeout_s=60,
    )
    return deployment.bind()


app = build_app()
