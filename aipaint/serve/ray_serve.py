"""``aipaint serve`` on Ray Serve: the same A1111 HTTP API (:func:`aipaint.serve.app.create_app`),
in as many replicas as the load needs, each with its own model and its own job queue.

Each replica builds the FastAPI application of :mod:`aipaint.serve.app` when it starts
(``serve.ingress`` with the app late-bound, ``__serve_build_asgi_app__``), so the model is loaded
once per replica, in the replica, never in the process that deploys. A replica runs one job at a
time, as ``aipaint serve`` does; Ray Serve spreads requests over the replicas and holds at most
``max_ongoing_requests`` (the replica's queue size, ``ServerConfig.queue_size``) on each one. A
request that finds every replica full waits in Serve's queue, ``max_queued_requests`` long, and
beyond that is answered 503. With ``max_replicas`` above ``min_replicas`` the number of replicas
follows the load: Serve aims at ``target_ongoing_requests`` (default 2: one running, one waiting)
per replica.

Per replica, not per deployment: ``/sdapi/v1/progress``, ``/interrupt`` and ``/skip`` reach the
replica that answers them, not necessarily the one running your job; ``POST /sdapi/v1/options``
that switches the checkpoint switches one replica only. Deploy one model (``model=``) per
deployment and leave the checkpoint alone.

From Python::

    from ray import serve
    from aipaint.serve.app import ServerConfig
    from aipaint.serve.ray_serve import build_app

    serve.run(build_app(ServerConfig(model="sd15"), min_replicas=1, max_replicas=4, num_gpus=1))

From the shell (an application builder; arguments as ``key=value``)::

    serve run aipaint.serve.ray_serve:app_builder model=sd15 device=cuda max_replicas=4 num_gpus=1

See docs/scale-out.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ray import serve

from aipaint.errors import InvalidParameter
from aipaint.serve.app import ServerConfig, create_app

__all__ = ["AipaintReplica", "app_builder", "build_app", "deployment_options"]

DEFAULT_TARGET_ONGOING_REQUESTS = 2  # one job running, one waiting: a replica never idles between jobs


@serve.ingress()
class AipaintReplica:
    """One replica: a :class:`ServerConfig`, made into ``aipaint serve``'s application when the replica starts."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.config)  # loads the model, here, once per replica


def deployment_options(config: ServerConfig, *, num_replicas: int | None = None, min_replicas: int | None = None,
                       max_replicas: int | None = None, target_ongoing_requests: float = DEFAULT_TARGET_ONGOING_REQUESTS,
                       num_cpus: float = 1.0, num_gpus: float | None = None,
                       max_queued_requests: int | None = None) -> dict[str, Any]:
    """The options of the deployment (``serve.deployment(...).options(**these)``): a fixed number
    of replicas (``num_replicas``, default 1), or autoscaling between ``min_replicas`` and
    ``max_replicas``; the resources of each replica (a GPU each when the config loads on ``cuda``,
    unless ``num_gpus`` says otherwise); the queue of each replica and Serve's queue in front."""
    autoscaling = min_replicas is not None or max_replicas is not None
    if autoscaling and num_replicas is not None:
        raise InvalidParameter("num_replicas", num_replicas, "cannot be given with min_replicas/max_replicas",
                               "a fixed number, or autoscaling between two, not both")
    for name, value in (("num_replicas", num_replicas), ("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "min_replicas" else 1)):
            raise InvalidParameter(name, value, "must be a whole number of replicas" + (", 0 or more" if name == "min_replicas" else ", 1 or more"))
    if autoscaling and (min_replicas or 0) > (max_replicas or max(1, min_replicas or 0)):
        raise InvalidParameter("max_replicas", max_replicas, f"must be at least min_replicas ({min_replicas})")
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("target_ongoing_requests", target_ongoing_requests)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise InvalidParameter(name, value, "must be a number, 0 or more")
    if num_gpus is None:
        num_gpus = 1.0 if str(config.load_options.get("device", "cpu")).startswith("cuda") else 0.0
    queue = config.queue_size
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        # A replica holds what its own job queue takes (one running, the rest waiting in arrival order).
        "max_ongoing_requests": queue,
        # In front of the replicas: as many again wait for a free place; more are answered 503.
        "max_queued_requests": queue if max_queued_requests is None else max_queued_requests,
    }
    if autoscaling:
        low = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": max_replicas or max(1, low),
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        options["num_replicas"] = 1 if num_replicas is None else num_replicas
    return options


def build_app(config: ServerConfig | None = None, *, name: str = "aipaint", **options: Any) -> Any:
    """The Serve application (give it to ``serve.run``): ``aipaint serve``'s API for ``config``,
    deployed with :func:`deployment_options` (``options`` are its keyword arguments)."""
    config = config if config is not None else ServerConfig()
    deployment = serve.deployment(AipaintReplica, name=name).options(**deployment_options(config, **options))
    return deployment.bind(config)


# ``serve run aipaint.serve.ray_serve:app_builder key=value …``: every value arrives as text.
_CONFIG_ARGS = {"model": str, "models_dir": Path, "lora_dir": Path, "output_dir": Path, "styles_file": Path,
                "queue_size": int, "api_auth": str, "cors_origins": str, "device": str, "dtype": str}
_DEPLOYMENT_ARGS = {"num_replicas": int, "min_replicas": int, "max_replicas": int, "num_cpus": float,
                    "num_gpus": float, "target_ongoing_requests": float, "max_queued_requests": int}


def app_builder(args: dict[str, str]) -> Any:
    """The application ``serve run aipaint.serve.ray_serve:app_builder model=… device=cuda max_replicas=4``
    builds: ``model``, ``models_dir``, ``lora_dir``, ``output_dir``, ``styles_file``, ``queue_size``,
    ``api_auth`` (``user:password``), ``cors_origins`` (comma-separated), ``device``, ``dtype``, and
    the arguments of :func:`deployment_options`."""
    config: dict[str, Any] = {}
    load: dict[str, Any] = {}
    deployment: dict[str, Any] = {}
    for key, text in args.items():
        kind = _CONFIG_ARGS.get(key) or _DEPLOYMENT_ARGS.get(key)
        if kind is None:
            from aipaint.api.options import close_matches

            known = [*_CONFIG_ARGS, *_DEPLOYMENT_ARGS]
            raise InvalidParameter("argument", key, "is not an argument of aipaint's Serve app; known: "
                                   + ", ".join(known) + close_matches(key, known))
        try:
            value = kind(text)
        except ValueError:
            raise InvalidParameter(key, text, "must be " + ("a whole number" if kind is int else "a number")) from None
        if key in ("device", "dtype"):
            load[key] = value
        elif key == "api_auth":
            user, sep, password = value.partition(":")
            if not sep or not user:
                raise InvalidParameter("api_auth", "…", "must be user:password")
            config["api_auth"] = (user, password)
        elif key == "cors_origins":
            config["cors_origins"] = tuple(part.strip() for part in value.split(",") if part.strip())
        elif key in _CONFIG_ARGS:
            config[key] = value
        else:
            deployment[key] = value
    server = ServerConfig(**config)
    if load:
        server = dataclasses.replace(server, load_options={**server.load_options, **load})
    return build_app(server, **deployment)
