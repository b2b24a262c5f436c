"""Running the server: ``start_server`` in a background thread for tests and scripts (a
``ServerHandle`` to read its counts and stop it), ``serve`` in the foreground for the command,
both on a socket ``bind`` opened before the model loads."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from omegaconf import DictConfig

from neuronlens.errors import UserError
from neuronlens.serve.app import build_app
from neuronlens.serve.engine import ServerState, make_state


@dataclass
class ServerHandle:
    """A server running in a background thread. ``requests``: counts by endpoint path (the
    readiness probe is one ``/v1/models``); ``faults``: counts by fault name (POST requests)."""

    server: uvicorn.Server
    thread: threading.Thread
    state: ServerState
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        """The served model name, the one requests must give."""
        return self.state.model_name

    @property
    def requests(self) -> Counter:
        return self.state.requests

    @property
    def faults(self) -> Counter:
        return self.state.fault_counts

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``: connections queue from here on, so the server is
    announced only once this has succeeded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror}); is another server there? "
                        "Choose another with port=...") from e
    return sock


def start_server(model: str, port: int = 0, *, device: str = "auto", dtype: str = "auto",
                 strict_model: bool = True, faults: Any = (), retry_after: float = 0.1,
                 slow_seconds: float = 5.0, max_logprobs: int | None = 20,
                 api_key: str | None = None, timeout: float = 30.0) -> ServerHandle:
    """Serve ``model`` on 127.0.0.1:``port`` (0: a free port) in a background thread; returns once
    ``/v1/models`` answers. Requests must name ``model`` exactly (``handle.model``) unless
    ``strict_model=False``; ``max_logprobs=None`` lifts the limit of 20 logprobs per token; with
    ``api_key`` every request must send it as its bearer token."""
    state = make_state(model, device, dtype, strict_model, faults, retry_after, slow_seconds,
                       max_logprobs, api_key)
    sock = bind("127.0.0.1", port)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name=f"neuronlens-serve:{sock.getsockname()[1]}")
    thread.start()
    handle = ServerHandle(server, thread, state, sock.getsockname()[1])
    deadline = time.monotonic() + timeout
    while True:
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            if httpx.get(f"{handle.base_url}/models", headers=headers, timeout=1.0).status_code == 200:
                return handle
        except httpx.TransportError:
            pass
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"neuronlens-serve did not start on port {handle.port}.")
        time.sleep(0.05)


def loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: it may resolve to any interface
        return False


def serve(cfg: DictConfig) -> None:
    """Serve until stopped (Ctrl-C), with the options of ``conf/serve.yaml``."""
    key = os.environ.get(str(cfg.api_key_env)) or None   # from the environment, never a config file
    if key is None and not loopback(str(cfg.host)) and not cfg.allow_without_key:
        raise UserError(f"neuronlens-serve will not listen on {cfg.host} without an API key: set "
                        f"{cfg.api_key_env} (clients send it, e.g. as VLLM_API_KEY with the vllm "
                        "backend), or pass allow_without_key=true if only you can reach this network.")
    sock = bind(str(cfg.host), int(cfg.port))   # first: a taken port fails before the model loads
    state = make_state(str(cfg.model), cfg.device, cfg.dtype, cfg.strict_model, cfg.faults,
                       cfg.retry_after, cfg.slow_seconds, cfg.max_logprobs, key)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="info"))
    print(f"neuronlens-serve: {cfg.model} at http://{cfg.host}:{sock.getsockname()[1]}/v1"
          + (f" (requests must send the key in {cfg.api_key_env})" if key else ""), flush=True)
    server.run(sockets=[sock])
