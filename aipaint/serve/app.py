"""The HTTP server: A1111's ``/sdapi/v1`` endpoints on FastAPI, over one loaded pipeline.

:func:`create_app` builds the application from a :class:`ServerConfig`. Generation bodies
become requests in :mod:`aipaint.serve.a1111`; the model's work runs one job at a time
through :class:`aipaint.serve.jobs.JobQueue`. Every error a client can cause is answered
as A1111 shapes errors (``{"error", "detail", "body", "errors"}``) with a 4xx status and a
one-line message; nothing is written to disk unless a request sets ``save_images``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from aipaint.errors import AipaintError, InvalidParameter, UnknownName
from aipaint.serve import a1111
from aipaint.serve.jobs import Interrupted, JobQueue, QueueFull

DEFAULT_MAX_BODY = 32 * 2**20


@dataclass
class ServerConfig:
    """What ``aipaint serve`` was started with."""

    model: str | None = None  # as for aipaint.load: None is the embedded model
    models_dir: Path | None = None  # more checkpoints /options may switch to, by name
    lora_dir: Path | None = None
    output_dir: Path = Path("outputs")
    api_auth: tuple[str, str] | None = None
    cors_origins: tuple[str, ...] = ()
    queue_size: int = 16
    max_body_bytes: int = DEFAULT_MAX_BODY
    load_options: dict[str, Any] = field(default_factory=dict)  # device, dtype, … for aipaint.load


class ApiError(AipaintError):
    """An error with its own HTTP status (the default for user errors is 422)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def error_response(status: int, exc: BaseException) -> JSONResponse:
    """A1111's error shape, with a one-line message and no traceback."""
    message = " ".join(str(exc).split())
    return JSONResponse({"error": type(exc).__name__, "detail": message, "body": "", "errors": message},
                        status_code=status)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by their Content-Length or as they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, f"the request body is larger than {self.limit:,} bytes, the most this server takes "
                                  "(aipaint serve --max-body-mb)")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await error_response(413, too_large)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large
            return message

        await self.app(scope, counted, send)


class Server:
    """The loaded pipeline, the job queue, and the settings ``/options`` reads and writes."""

    def __init__(self, config: ServerConfig, pipeline: Any = None) -> None:
        self.config = config
        self.queue = JobQueue(config.queue_size)
        self.pipeline = pipeline if pipeline is not None else self._load(config.model)
        self.checkpoint = self._name_of(config.model)
        self.clip_skip = 1

    # --- models --------------------------------------------------------------------------
    def _load(self, source: Any) -> Any:
        import aipaint

        return aipaint.load(source, **self.config.load_options)

    @staticmethod
    def _name_of(source: Any) -> str:
        return Path(str(source)).name if source is not None else "shapes-tiny"

    def checkpoints(self) -> dict[str, str]:
        """Every checkpoint /options may switch to, by name: the zoo's, the models folder's, the one loaded."""
        from aipaint.models import zoo

        found = {card.id: card.id for card in zoo.cards()}
        if self.config.models_dir is not None:
            found.update(_model_files(self.config.models_dir))
        found.setdefault(self.checkpoint, str(self.config.model) if self.config.model is not None else self.checkpoint)
        return found

    def switch(self, name: Any) -> None:
        """Load checkpoint ``name`` (one of :meth:`checkpoints`, nothing else) in the queue's turn."""
        name = a1111.model_name(name)
        if name == self.checkpoint:
            return
        known = self.checkpoints()
        if name not in known:
            raise UnknownName("sd_model_checkpoint", name, sorted(known))
        with self.queue.turn("load model"):
            self.pipeline = self._load(known[name])
            self.checkpoint = name

    # --- generation ----------------------------------------------------------------------
    def generate(self, body: Any, kind: str, ticket: int) -> dict[str, Any]:
        """Run an A1111 generation body in the queue's turn of ``ticket``."""
        try:  # everything checked before the job waits; the model is checked again in its turn (a switch may come between)
            job = self._job(body, kind)
            self._check_model(job)
            self.pipeline.check(job.request)
        except BaseException:
            self.queue.cancel(ticket)
            raise
        results = []
        with self.queue.turn(kind, job.n_iter, ticket) as state:
            self._check_model(job)
            request = job.request
            if "CLIP_stop_at_last_layers" not in (body.get("override_settings") or {}):
                request = dataclasses.replace(request, clip_skip=self.clip_skip)
            request = self.pipeline.check(request).with_seed()
            for number in range(job.n_iter):
                state.job_no, state.skipped, state.preview = number, False, None
                seed = (request.seed + number * request.batch_size) % (2**32)
                progress, preview = self.queue.callbacks(state)
                try:
                    results.append(self.pipeline.generate(dataclasses.replace(request, seed=seed), progress,
                                                          preview=preview))
                except Interrupted:
                    if state.interrupted:
                        break
        images = [(image, text) for result in results for image, text in zip(result.images, result.infotexts, strict=True)]
        if job.save_images:
            self._save(images, kind)
        return {
            "images": [a1111.encode_image(image, text) for image, text in images] if job.send_images else [],
            "parameters": a1111.parameters(body),
            "info": a1111.info(job, results),
        }

    def _check_model(self, job: a1111.Job) -> None:
        if job.checkpoint is not None and job.checkpoint != self.checkpoint:
            raise InvalidParameter("override_settings.sd_model_checkpoint", job.checkpoint,
                                   f"is not the loaded model ({self.checkpoint!r})",
                                   "switch models with POST /sdapi/v1/options {\"sd_model_checkpoint\": ...}")

    def _job(self, body: Any, kind: str) -> a1111.Job:
        options = {"lora": {"folder": str(self.config.lora_dir)}} if self.config.lora_dir is not None else None
        return a1111.build_job(body, kind, request_options=options)

    def _save(self, images: list[tuple[Any, str]], kind: str) -> None:
        from aipaint.api.result import output_path, save_png

        folder = self.config.output_dir / f"{kind}-images"
        folder.mkdir(parents=True, exist_ok=True)
        for image, text in images:
            save_png(image, output_path(None, 1, default=str(folder / "image.png")), text, overwrite=False)

    def progress(self) -> dict[str, Any]:
        state = self.queue.state
        current = None
        if state.preview is not None:
            current = a1111.encode_image(state.preview.image("cheap"))
        fraction = state.progress
        elapsed = 0.0 if not state.started else max(0.0, time.time() - state.started)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "skipped": state.skipped, "interrupted": state.interrupted, "job": state.job,
                "job_count": state.job_count, "job_timestamp": str(int(state.started)) if state.started else "0",
                "job_no": state.job_no, "sampling_step": state.sampling_step, "sampling_steps": state.sampling_steps,
            },
            "current_image": current,
            "textinfo": f"{state.job} {state.job_no + 1}/{state.job_count}" if state.job else None,
        }

    def options(self) -> dict[str, Any]:
        return {"sd_model_checkpoint": self.checkpoint, "CLIP_stop_at_last_layers": self.clip_skip,
                "outdir_samples": str(self.config.output_dir), "samples_format": "png"}

    def set_options(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise InvalidParameter("body", body, "must be a JSON object of setting → value")
        if "CLIP_stop_at_last_layers" in body:
            from aipaint.api.request import CLIP_SKIP_RANGE, check_range

            check_range("CLIP_stop_at_last_layers", body["CLIP_stop_at_last_layers"], *CLIP_SKIP_RANGE)
        if body.get("sd_model_checkpoint") is not None:
            self.switch(body["sd_model_checkpoint"])
        if "CLIP_stop_at_last_layers" in body:
            self.clip_skip = body["CLIP_stop_at_last_layers"]


def _model_files(root: Path) -> dict[str, str]:
    """Checkpoints below ``root`` by relative name: diffusers pipeline folders (``model_index.json``,
    whose own files are not models) and single files; nothing whose real path leaves ``root``."""
    from aipaint.plugin.kit.folders import PICKLE_SUFFIXES, SAFE_SUFFIXES, is_inside

    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if here != root and "model_index.json" in filenames:
            if is_inside(here, root):
                found[here.relative_to(root).as_posix()] = str(here)
            dirnames.clear()
            continue
        dirnames.sort()
        for filename in sorted(filenames):
            path = here / filename
            if path.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES and is_inside(path, root):
                found.setdefault(path.relative_to(root).with_suffix("").as_posix(), str(path))
    return found


def _png_info(body: Any) -> dict[str, Any]:
    from aipaint.infotext import Infotext

    if not isinstance(body, dict):
        raise InvalidParameter("body", body, "must be a JSON object with an \"image\"")
    image = a1111.decode_image(body.get("image"), "image")
    text = image.info.get("parameters")
    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    if not text:
        return {"info": "", "items": items, "parameters": {}}
    parsed = Infotext.from_text(text)
    return {"info": text, "items": items,
            "parameters": {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.params}}


def _memory() -> dict[str, Any]:
    import torch

    ram: dict[str, Any] = {}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * size
        ram = {"free": free, "used": pages * size - free, "total": pages * size}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "unavailable on this system"}
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}
    return {"ram": ram, "cuda": cuda}


def create_app(config: ServerConfig, pipeline: Any = None) -> FastAPI:
    """The application; ``pipeline`` (an ``aipaint.Pipeline``) is loaded from ``config.model`` when not given."""
    server = Server(config, pipeline)
    app = FastAPI(title="aipaint", description="A1111-compatible API (see docs/serving.md)", docs_url="/docs")
    app.state.server = server

    @app.exception_handler(AipaintError)
    async def _aipaint_error(request: Request, exc: AipaintError) -> JSONResponse:
        status = exc.status if isinstance(exc, ApiError) else 503 if isinstance(exc, QueueFull) else 422
        return error_response(status, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's doing: the type only, the traceback stays in the server's log.
        return error_response(500, ApiError(500, f"internal error ({type(exc).__name__}); see the server's log"))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, InvalidParameter("body", exc.doc[:40], f"is not valid JSON ({exc.msg})"))

    if config.api_auth is not None:
        user, password = (part.encode() for part in config.api_auth)

        @app.middleware("http")
        async def _basic_auth(request: Request, call_next: Any) -> Any:
            given = request.headers.get("authorization", "")
            ok = False
            if given.lower().startswith("basic "):
                try:
                    name, _, secret = base64.b64decode(given[6:], validate=True).partition(b":")
                except ValueError:
                    name, secret = b"", b""
                # Both compared always, each in constant time: no early exit tells which one was wrong.
                ok = secrets.compare_digest(name, user) & secrets.compare_digest(secret, password)
            if not ok:
                response = error_response(401, ApiError(401, "this server needs HTTP basic authentication (--api-auth)"))
                response.headers["WWW-Authenticate"] = 'Basic realm="aipaint"'
                return response
            return await call_next(request)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=True)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    async def _json(request: Request) -> Any:
        raw = await request.body()
        return json.loads(raw) if raw.strip() else {}

    api = "/sdapi/v1"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        from aipaint.serve.page import PAGE

        return PAGE

    @app.post(f"{api}/txt2img")
    async def txt2img(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _run_blocking(server.generate, body, "txt2img", server.queue.ticket())

    @app.post(f"{api}/img2img")
    async def img2img(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _run_blocking(server.generate, body, "img2img", server.queue.ticket())

    @app.post(f"{api}/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        return _png_info(await _json(request))

    @app.post(f"{api}/interrupt")
    def interrupt() -> None:
        server.queue.interrupt()

    @app.post(f"{api}/skip")
    def skip() -> None:
        server.queue.skip()

    @app.get(f"{api}/progress")
    def progress() -> dict[str, Any]:
        return server.progress()

    @app.get(f"{api}/options")
    def get_options() -> dict[str, Any]:
        return server.options()

    @app.post(f"{api}/options")
    async def set_options(request: Request) -> None:
        body = await _json(request)
        await _run_blocking(server.set_options, body)

    @app.get(f"{api}/samplers")
    def samplers() -> list[dict[str, Any]]:
        return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in server.pipeline.host.registry.samplers]

    @app.get(f"{api}/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        names: dict[str, None] = {"Automatic": None}
        for sampler in server.pipeline.host.registry.samplers:
            names.update(dict.fromkeys(sampler.schedules))
        return [{"name": n, "label": n, "aliases": None, "default_rho": -1, "need_inner_model": False} for n in names]

    @app.get(f"{api}/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        return []  # the server has no upscaling endpoints (see docs/serving.md)

    @app.get(f"{api}/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": source, "config": None}
                for name, source in server.checkpoints().items()]

    @app.get(f"{api}/loras")
    def loras() -> list[dict[str, Any]]:
        from aipaint.plugin.kit.folders import ModelFolder, default_folder

        root = config.lora_dir or default_folder("AIPAINT_LORA_DIR", "loras")
        return [{"name": f.name, "alias": f.name, "path": str(f.path), "metadata": {}}
                for f in ModelFolder(root, "lora").files()]

    @app.get(f"{api}/embeddings")
    def embeddings() -> dict[str, Any]:
        from aipaint.plugin.kit.folders import ModelFolder, default_folder

        root = default_folder("AIPAINT_EMBEDDINGS_DIR", "embeddings")
        return {"loaded": {f.name: {"sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
                           for f in ModelFolder(root, "embedding").files()}, "skipped": {}}

    @app.get(f"{api}/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return {"model": config.model, "models_dir": str(config.models_dir) if config.models_dir else None,
                "lora_dir": str(config.lora_dir) if config.lora_dir else None, "outdir": str(config.output_dir),
                "api_auth": config.api_auth is not None, "cors_allow_origins": list(config.cors_origins),
                "queue_size": config.queue_size, "max_body_bytes": config.max_body_bytes}

    @app.get(f"{api}/memory")
    def memory() -> dict[str, Any]:
        return _memory()

    @app.post(f"{api}/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        """The list is read from disk at each /sd-models; nothing is cached to refresh."""

    @app.post(f"{api}/refresh-loras")
    def refresh_loras() -> None:
        """The list is read from disk at each /loras; nothing is cached to refresh."""

    return app


async def _run_blocking(function: Any, *args: Any) -> Any:
    # The model's work blocks; it runs in a worker thread so /progress and /interrupt answer meanwhile.
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="info")


__all__ = ["ServerConfig", "create_app", "serve"]
