"""Serve a model over HTTP on Ray Serve: :func:`serve` and ``diffblocks serve``.

The options are checked before Ray starts (:class:`ServeOptions`); Ray is an optional extra, imported
only here and in :mod:`diffblocks.scale.endpoint`, and its absence is reported with the install hint.
Serve runs on the Ray cluster this process is connected to, or on a local one it starts and stops.
"""

from __future__ import annotations

import logging
import socket
import time
from pydantic import BaseModel, ConfigDict, Field, model_validator

APP_NAME = "diffblocks"

_MSG_NO_RAY = 'serving needs Ray Serve, an optional extra: pip install -e ".[ray]" (missing: {missing})'
_MSG_SERVE_RUNNING = (
    "Serve already runs on this Ray cluster, and its host and port cannot change while it does; "
    "shut the earlier server down (Server.shutdown(), or ray.serve.shutdown()) first"
)
_MSG_BATCH_ABOVE_ONGOING = (
    "max_batch_size {batch} is above max_ongoing_requests {ongoing}: a replica holds at most "
    "max_ongoing_requests requests, so it could never fill a batch; raise max_ongoing_requests or lower max_batch_size"
)


def require_ray() -> None:
    """Raise ``ModuleNotFoundError`` with the install hint unless Ray Serve and FastAPI can be imported."""
    for module in ("ray", "ray.serve", "fastapi"):
        try:
            __import__(module)
        except ImportError as error:
            raise ModuleNotFoundError(_MSG_NO_RAY.format(missing=module)) from error


class ServeOptions(BaseModel):
    """How to serve: where, how many replicas, and how requests are batched and queued.

    Args:
        model: a Hub id or folder of a supported family; None: the built-in model.
        host: the address to listen on; the default answers this machine only.
        port: the HTTP port; 0 picks a free one.
        replicas: model copies, one Ray actor each (one CPU, or one GPU when the cluster has them).
        max_batch_size: most requests a replica runs as one pipeline call.
        batch_wait_timeout_s: how long a replica waits for a batch to fill before running what it has.
        max_ongoing_requests: requests a replica holds at once, running or waiting for a batch
            (None: twice ``max_batch_size``).
        max_queued_requests: requests waiting for a free replica; one more is answered 503.
        device: the replicas' device (None: cuda when the replica has a GPU, else the CPU).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0, allow_inf_nan=False)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=0)
    device: str | None = None

    @model_validator(mode="after")
    def _batches_fit(self) -> ServeOptions:
        if self.max_ongoing_requests is not None and self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(_MSG_BATCH_ABOVE_ONGOING.format(batch=self.max_batch_size, ongoing=self.max_ongoing_requests))
        return self

    @property
    def ongoing(self) -> int:
        """``max_ongoing_requests`` resolved: room for one batch running and the next filling."""
        return self.max_ongoing_requests if self.max_ongoing_requests is not None else 2 * self.max_batch_size


class Server:
    """A running endpoint: its :attr:`url`, and :meth:`shutdown` (also on leaving a ``with`` block)."""

    def __init__(self, url: str, options: ServeOptions, *, owns_ray: bool) -> None:
        self.url = url
        self.options = options
        self._owns_ray = owns_ray
        self._running = True

    def shutdown(self) -> None:
        """Stop Serve (its HTTP port closes), and Ray too if :func:`serve` started it; a second call does nothing."""
        if not self._running:
            return
        import ray
        from ray import serve as ray_serve

        self._running = False
        ray_serve.shutdown()
        if self._owns_ray:
            ray.shutdown()

    def wait(self) -> None:
        """Block until Ctrl-C, then shut down."""
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Server({self.url!r}, running={self._running})"


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_batch_size: int = 4,
    batch_wait_timeout_s: float = 0.05,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int = 64,
    device: str | None = None,
    blocking: bool = False,
) -> Server:
    """Serve ``model`` over HTTP on Ray Serve; returns once every replica holds the model.

    The options are :class:`ServeOptions`' (checked before Ray starts). Serve runs on the Ray cluster
    this process is connected to, else on a local one started here and stopped by :meth:`Server.shutdown`.
    Serve is one per cluster: shutting the server down stops Serve, with any other application on it.

    Args:
        blocking: serve until Ctrl-C, then shut down (the command line's way).

    ``docs/scale.md`` has a runnable example: serve on loopback, send requests, stop.
    """
    settings = ServeOptions(
        model=model,
        host=host,
        port=port,
        replicas=replicas,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests,
        device=device,
    )
    require_ray()
    import ray
    from ray import serve as ray_serve

    from diffblocks.scale.endpoint import Generator

    owns_ray = not ray.is_initialized()
    if owns_ray:
        # a cluster of our own ("local"), not one another program on this machine started
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    elif ray_serve.status().proxies:
        raise RuntimeError(_MSG_SERVE_RUNNING)
    try:
        port = settings.port or _free_port(settings.host)
        ray_serve.start(http_options={"host": settings.host, "port": port})
        deployment = Generator.options(
            num_replicas=settings.replicas,
            max_ongoing_requests=settings.ongoing,
            max_queued_requests=settings.max_queued_requests,
            ray_actor_options=_replica_resources(settings.device),
        )
        app = deployment.bind(settings.model, settings.device, settings.max_batch_size, settings.batch_wait_timeout_s)
        ray_serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:
        ray_serve.shutdown()
        if owns_ray:
            ray.shutdown()
        raise
    server = Server(f"http://{_url_host(settings.host)}:{port}", settings, owns_ray=owns_ray)
    if blocking:
        print(f"serving {settings.model or 'the built-in model'} at {server.url} (Ctrl-C to stop)", flush=True)
        server.wait()
    return server


def _replica_resources(device: str | None) -> dict[str, float]:
    """One GPU per replica where the cluster has GPUs and the device allows it, else one CPU."""
    import ray

    wants_gpu = device is None or device.startswith("cuda")
    if wants_gpu and ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def _free_port(host: str) -> int:
    """A port nothing listens on now (the OS's pick); Serve binds it right after."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _url_host(host: str) -> str:
    """The host as a URL shows it: a wildcard address is reached on loopback, IPv6 in brackets."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
