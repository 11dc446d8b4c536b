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
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from aipaint.errors import AipaintError, InvalidParameter, UnknownName, UnsupportedFeature
from aipaint.plugin.postprocess import PostStep
from aipaint.serve import a1111
from aipaint.serve.jobs import Interrupted, JobQueue, QueueFull

DEFAULT_MAX_BODY = 32 * 2**20
log = logging.getLogger("aipaint.serve")


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
    styles_file: Path | None = None  # A1111's styles.csv: the prompt styles requests may name


@dataclass(frozen=True)
class ImageModel:
    """A weights file in the upscaler folder, as spandrel reads it."""

    name: str  # its name there (relative path without suffix), as upscaler names are written
    file: str  # its relative path there, with suffix
    architecture: str  # ESRGAN, GFPGAN, RestoreFormer, …
    purpose: str  # "SR", "FaceSR" (a face restorer) or "Restoration"
    scale: int


class ApiError(AipaintError):
    """An error with its own HTTP status (the default for user errors is 422)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def error_response(status: int, exc: BaseException, message: str | None = None) -> JSONResponse:
    """A1111's error shape, with a one-line message (``exc``'s unless given) and no traceback."""
    message = " ".join((str(exc) if message is None else message).split())
    return JSONResponse({"error": type(exc).__name__, "detail": message, "body": "", "errors": message},
                        status_code=status)


# An absolute path in a message: POSIX (its first part is checked to exist at /) or a Windows drive path.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/\\-])(?:/[^\s'\"(),;:<>]+|[A-Za-z]:\\[^\s'\"(),;<>]+)")


def _folders(config: ServerConfig) -> list[tuple[str, Path]]:
    """The server's folders, by the names its error messages use for them instead of their paths."""
    from aipaint.plugin.kit.folders import aipaint_home, controlnet_dir, default_folder
    from aipaint.plugin.kit.image_models import upscaler_dir

    folders = [("LORA_DIR", config.lora_dir or default_folder("AIPAINT_LORA_DIR", "loras")),
               ("CONTROLNET_DIR", controlnet_dir()), ("UPSCALER_DIR", upscaler_dir()),
               ("EMBEDDINGS_DIR", default_folder("AIPAINT_EMBEDDINGS_DIR", "embeddings")),
               ("MODELS_DIR", config.models_dir), ("OUTDIR", config.output_dir),
               ("AIPAINT_HOME", aipaint_home()), ("~", Path.home())]
    return [(name, Path(folder)) for name, folder in folders if folder is not None]


def hide_paths(message: str, config: ServerConfig, sent: str = "") -> str:
    """``message`` without the server's paths: its folders by name (``LORA_DIR``, …), any other
    absolute path as ``<server path>``, except paths the client itself ``sent`` (its body's text)."""
    replacements: dict[str, str] = {}
    for name, folder in _folders(config):
        for form in (folder.expanduser().absolute(), folder.expanduser().resolve()):
            if str(form) not in ("/", "."):
                replacements.setdefault(str(form), name)
    for path in sorted(replacements, key=len, reverse=True):
        message = re.sub(re.escape(path) + r"(?![\w.-])", lambda _, name=replacements[path]: name, message)

    def hidden(match: re.Match[str]) -> str:
        path = match.group(0)
        if path in sent:
            return path
        first = path.lstrip("/").split("/")[0]
        if path.startswith("/") and not (first and os.path.exists("/" + first)):
            return path  # not a path here: a route such as /sdapi/v1/options
        return "<server path>"

    return _ABSOLUTE_PATH.sub(hidden, message)


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
        from aipaint.prompt.styles import load_styles

        self.config = config
        self.styles = load_styles(config.styles_file) if config.styles_file is not None else {}
        self.queue = JobQueue(config.queue_size)
        self.pipeline = pipeline if pipeline is not None else self._load(config.model)
        self.checkpoint = self._name_of(config.model)
        self.clip_skip = 1
        self._image_models: dict[tuple[str, int, int, bool], ImageModel | None] = {}
        self._latent: dict[str, bool] = {}

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

    # --- upscalers and face restorers (the upscale and facefix plugins, through the post-processor registry) ---
    @property
    def _allow_pickle(self) -> bool:
        return self.config.load_options.get("allow_pickle") is True

    def _upscale_options(self) -> dict[str, Any]:
        device = self.config.load_options.get("device")
        return {"allow_pickle": self._allow_pickle, **({"device": device} if isinstance(device, str) else {})}

    def _postprocess(self, image: Any, step: PostStep) -> Any:
        from aipaint.engine.postprocessing import run_postprocessors

        return run_postprocessors(image, [step], host=self.pipeline.host)

    def upscaler_names(self) -> list[str]:
        """Every upscaler the ``upscale`` post-processor knows (latent, pixel and model ones), by name.

        The core never imports a plugin, and the post-processor registry has no way to list a
        processor's choices; asked for a name it does not have, the ``upscale`` processor answers
        with the names it has (:class:`UnknownName`), before it reads or loads anything."""
        from PIL import Image

        if "upscale" not in self.pipeline.host.registry.postprocessors:
            return []
        try:
            self._postprocess(Image.new("RGB", (8, 8)), PostStep("upscale", {"upscaler": "aipaint serve: no such upscaler"}))
        except UnknownName as exc:
            if exc.name == "upscaler":
                return list(exc.valid)
            raise
        raise RuntimeError("the upscale post-processor accepted an upscaler name it has no upscaler for")

    def _is_latent(self, name: str) -> bool:
        """Whether a built-in upscaler resizes latents (hires fix only): the ``upscale`` processor
        refuses those on a picture, and runs a pixel one on an 8x8 image in no time."""
        if name not in self._latent:
            from PIL import Image

            try:
                self._postprocess(Image.new("RGB", (8, 8)), PostStep("upscale", {"upscaler": name, "scale": 1}))
                self._latent[name] = False
            except UnsupportedFeature:
                self._latent[name] = True
        return self._latent[name]

    def image_models(self) -> list[ImageModel]:
        """The loadable weights in the upscaler folder (model upscalers and face restorers), with
        what spandrel reads in them; a file's facts are kept until it changes. Pickle files count
        only with ``--allow-pickle``; files that do not load are left out (and logged)."""
        from aipaint.plugin.kit.image_models import load_image_model, upscaler_dir, weights_folder

        root, allow = upscaler_dir(), self._allow_pickle
        found = []
        for item in weights_folder(root).files():
            if item.is_pickle and not allow:
                continue
            try:
                stat = item.path.stat()
            except OSError:
                continue
            key = (str(item.path), stat.st_mtime_ns, stat.st_size, allow)
            if key not in self._image_models:
                try:
                    model = load_image_model(item.path, allow_pickle=allow)
                    self._image_models[key] = ImageModel(item.name, item.path.relative_to(root).as_posix(),
                                                         model.architecture, model.purpose, model.scale)
                except Exception as exc:  # a broken file must not break the list
                    log.warning("upscaler folder: %s does not load: %s", item.name, exc)
                    self._image_models[key] = None
            if self._image_models[key] is not None:
                found.append(self._image_models[key])
        return found

    def upscalers(self) -> tuple[list[str], list[str], list[ImageModel]]:
        """(latent upscalers, pixel upscalers, model upscalers): what A1111 lists as latent
        upscale modes and as upscalers. Face restorers are not upscalers."""
        from aipaint.plugin.kit.image_models import weights_folder

        models = {m.name: m for m in self.image_models()}
        files = {item.name for item in weights_folder().files()}
        latent, pixel, upscaling = [], [], []
        for name in self.upscaler_names():
            if name in models:
                if models[name].purpose != "FaceSR":
                    upscaling.append(models[name])
            elif name in files:
                continue  # a file that does not load (or a pickle without --allow-pickle)
            elif self._is_latent(name):
                latent.append(name)
            else:
                pixel.append(name)
        return latent, pixel, upscaling

    def face_restorers(self) -> list[ImageModel]:
        return [m for m in self.image_models() if m.purpose == "FaceSR"]

    def upscaler(self, name: str | None, field_name: str, *, latent: bool = False) -> str | None:
        """The upscaler ``name`` (any case, as A1111 names it) is, or :class:`UnknownName` naming the
        ones there are; ``None`` for A1111's "None". Latent ones only where ``latent`` (hires fix)."""
        from aipaint.plugin.registry import normalise_name

        if name is None or name.strip().lower() == "none":
            return None
        latents, pixels, models = self.upscalers()
        valid = ["None", *(latents if latent else []), *pixels, *(m.name for m in models)]
        for known in valid[1:]:
            if normalise_name(known) == normalise_name(name):
                return known
        if not latent and any(normalise_name(known) == normalise_name(name) for known in latents):
            raise InvalidParameter(field_name, name, "resizes latents, which only hires fix can do",
                                   "pick one of " + ", ".join(repr(v) for v in valid))
        raise UnknownName(field_name, name, valid)

    def face_restorer(self, architecture: str, field_name: str, value: float) -> str:
        """The face restorer of ``architecture`` (``GFPGAN``, ``CodeFormer``) in the upscaler folder."""
        restorers = self.face_restorers()
        for model in restorers:
            if model.architecture.lower() == architecture.lower():
                return model.name
        there = ", ".join(f"{m.name!r} ({m.architecture})" for m in restorers) or "none"
        raise InvalidParameter(field_name, value, f"needs {architecture} weights in UPSCALER_DIR, and there are none",
                               f"face restorers there: {there}; see GET /sdapi/v1/face-restorers")

    # --- generation ----------------------------------------------------------------------
    def generate(self, body: Any, kind: str, ticket: int) -> dict[str, Any]:
        """Run an A1111 generation body in the queue's turn of ``ticket``."""
        from aipaint.engine.postprocessing import postprocess_result

        try:  # everything checked before the job waits; the model is checked again in its turn (a switch may come between)
            job = self._job(body, kind)
            self._check_model(job)
            post = self._post_steps(job, self.pipeline.check(job.request))
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
                    result = self.pipeline.generate(dataclasses.replace(request, seed=seed), progress, preview=preview)
                except Interrupted:
                    if state.interrupted:
                        break
                    continue
                if post:  # hires fix, then face fix: each image with its own seed and request
                    result = postprocess_result(result, post, self.pipeline)
                results.append(result)
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
        return a1111.build_job(body, kind, request_options=options, styles=self.styles, api_fields=self.api_fields())

    def api_fields(self) -> dict[str, tuple[str, str, Any]]:
        """Body fields the registered option groups read (e.g. Forge's ``distilled_cfg_scale``)."""
        return {key: (group.namespace, name, unset) for group in self.pipeline.host.registry.options
                for key, (name, unset) in getattr(group, "api_fields", {}).items()}

    def _post_steps(self, job: a1111.Job, request: Any) -> list[PostStep]:
        """The post-processors a job runs after each generation: ``hires`` (``enable_hr``), then
        ``facefix`` (``restore_faces``); their settings checked against the loaded model now."""
        steps = []
        if job.hires is not None:
            steps.append(PostStep("hires", self._hires_options(job, request)))
        if job.restore_faces:
            if "facefix" not in self.pipeline.host.registry.postprocessors:
                raise UnsupportedFeature("restore_faces runs the facefix post-processor, and no plugin registered it")
            steps.append(PostStep("facefix", {}))
        return steps

    def _hires_options(self, job: a1111.Job, request: Any) -> dict[str, Any]:
        from aipaint.models.latent import LatentDiffusionModel

        if job.hires_checkpoint is not None and job.hires_checkpoint != self.checkpoint:
            raise InvalidParameter("hr_checkpoint_name", job.hires_checkpoint, f"is not the loaded model ({self.checkpoint!r})",
                                   "hires fix runs its second pass with the loaded model")
        model = self.pipeline.model
        if "hires" not in self.pipeline.host.registry.postprocessors:
            raise UnsupportedFeature("enable_hr runs the hires post-processor, and no plugin registered it")
        if not isinstance(model, LatentDiffusionModel) or model.unet_in_channels != model.latent_channels:
            raise UnsupportedFeature(f"hires fix needs a latent diffusion model that is not an inpainting one; "
                                     f"{self.checkpoint!r} is not one")
        options = {k: v for k, v in job.hires.items() if k != "resize"}
        upscaler = self.upscaler(options["upscaler"], "hr_upscaler", latent=True)
        options["upscaler"] = upscaler or "Lanczos"  # A1111's "None": the picture resized, then redrawn
        sampler = options.get("hires_sampler")
        if sampler is not None and sampler not in self.pipeline.host.registry.samplers:
            raise UnknownName("hr_sampler_name", sampler, self.pipeline.host.registry.samplers.names())
        base = request.with_defaults(model.defaults)
        width, height = a1111.hires_size(base.width, base.height, job.hires)
        if "resize" in job.hires:
            options["resize_to"] = f"{width}x{height}"
        # The second pass as the hires post-processor will run it, checked now: size, sampler, steps, prompts.
        self.pipeline.check(dataclasses.replace(
            base, width=width, height=height, steps=options["hires_steps"] or base.steps,
            sampler=options.get("hires_sampler", base.sampler), prompt=options.get("hires_prompt", base.prompt),
            negative_prompt=options.get("hires_negative_prompt", base.negative_prompt)))
        options["allow_pickle"] = self._allow_pickle
        return options

    # --- extras --------------------------------------------------------------------------
    def extras(self, body: Any, batch: bool, ticket: int) -> dict[str, Any]:
        """Run an A1111 extras body (upscale, blend a second upscaler, restore faces) in the queue's turn."""
        try:
            job = a1111.build_extras(body, batch)
            upscaler_1 = self.upscaler(job.upscaler_1, "upscaler_1")
            upscaler_2 = self.upscaler(job.upscaler_2, "upscaler_2") if job.upscaler_2_visibility else None
            if upscaler_1 is not None and "upscale" not in self.pipeline.host.registry.postprocessors:
                raise UnsupportedFeature("upscaling runs the upscale post-processor, and no plugin registered it")
            restorers = [(label, self.face_restorer(label, f"{label.lower()}_visibility", value), value)
                         for label, value in (("GFPGAN", job.gfpgan_visibility), ("CodeFormer", job.codeformer_visibility))
                         if value]
        except BaseException:
            self.queue.cancel(ticket)
            raise
        images, lines = [], []
        with self.queue.turn("extras", len(job.images), ticket) as state:
            for number, (_, image) in enumerate(job.images):
                if state.interrupted:
                    break
                state.job_no, state.sampling_step, state.sampling_steps = number, 0, 1
                out, entries = self._extras_image(job, image, upscaler_1, upscaler_2, restorers)
                state.sampling_step = 1
                from aipaint.plugin.postprocess import merge_infotext

                images.append(a1111.encode_image(out, merge_infotext(image.info.get("parameters") or "", entries)
                                                 if entries else image.info.get("parameters")))
                lines.append(", ".join(f"{k}: {v}" for k, v in entries.items()))
        html = a1111.html_info(lines, job.ignored)
        return {"html_info": html, "images": images} if batch else {"html_info": html, "image": images[0] if images else None}

    def _extras_image(self, job: a1111.ExtrasJob, image: Any, upscaler_1: str | None, upscaler_2: str | None,
                      restorers: list[tuple[str, str, float]]) -> tuple[Any, dict[str, str]]:
        """One image through A1111's extras: upscale (and blend the second upscaler), crop, restore faces."""
        from PIL import Image

        entries: dict[str, str] = {}
        if upscaler_1 is not None:
            size = job.upscaled_size(*image.size)
            how = {"scale": job.scale} if job.resize_mode == 0 else {"resize_to": f"{size[0]}x{size[1]}"}
            first = self._postprocess(image, PostStep("upscale", {**self._upscale_options(), **how, "upscaler": upscaler_1}))
            entries.update(first.infotext)
            out = first.image
            if upscaler_2 is not None:
                second = self._postprocess(image, PostStep("upscale", {**self._upscale_options(), **how,
                                                                       "upscaler": upscaler_2}))
                out = Image.blend(out.convert("RGB"), second.image.convert("RGB").resize(out.size), job.upscaler_2_visibility)
                entries["Postprocess upscaler 2"] = upscaler_2
                entries["Postprocess upscaler 2 visibility"] = f"{job.upscaler_2_visibility:g}"
            if job.resize_mode == 1:
                entries.pop("Postprocess upscale by", None)
                entries["Postprocess upscale to"] = f"{job.size[0]}x{job.size[1]}"
                if job.crop:  # A1111: the picture that covers the size, cut to it around its centre
                    left, top = (out.width - job.size[0]) // 2, (out.height - job.size[1]) // 2
                    out = out.crop((left, top, left + job.size[0], top + job.size[1]))
                    entries["Postprocess crop to"] = f"{job.size[0]}x{job.size[1]}"
            image = out
        for label, restorer, visibility in restorers:
            restored = self._postprocess(image, PostStep("face-restore", {"restorer": restorer, "visibility": visibility,
                                                                          "allow_pickle": self._allow_pickle}))
            image = restored.image
            entries.update(restored.infotext)
            entries[f"{label} visibility"] = f"{visibility:g}"
        return image, entries

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
        # The server's folders are no business of a client: their paths leave the message.
        sent = getattr(request.state, "body", b"").decode("utf-8", "replace")
        return error_response(status, exc, hide_paths(str(exc), config, sent))

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
        request.state.body = raw  # what the client sent may be said back to it (hide_paths)
        return json.loads(raw) if raw.strip() else {}

    api = "/sdapi/v1"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        from aipaint.serve.page import PAGE

        return PAGE

    @app.post(f"{api}/txt2img")
    async def txt2img(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _run_job(request, server.queue, server.generate, body, "txt2img", server.queue.ticket())

    @app.post(f"{api}/img2img")
    async def img2img(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _run_job(request, server.queue, server.generate, body, "img2img", server.queue.ticket())

    @app.post(f"{api}/extra-single-image")
    async def extra_single_image(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _run_job(request, server.queue, server.extras, body, False, server.queue.ticket())

    @app.post(f"{api}/extra-batch-images")
    async def extra_batch_images(request: Request) -> dict[str, Any]:
        body = await _json(request)
        return await _run_job(request, server.queue, server.extras, body, True, server.queue.ticket())

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
        # A1111 names them in snake case ("sgm_uniform") and labels them as its UI does ("SGM Uniform").
        return [{"name": n.lower().replace(" ", "_"), "label": n, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n in names]

    @app.get(f"{api}/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        # As A1111 lists them: "None", the pixel upscalers (its scale 4), then the model files.
        _, pixels, models = server.upscalers()
        none = {"model_name": None, "model_path": None, "model_url": None, "scale": 4}
        return [{"name": name, **none} for name in ("None", *pixels)] + [
            {"name": m.name, "model_name": m.architecture, "model_path": m.file, "model_url": None, "scale": m.scale}
            for m in models]

    @app.get(f"{api}/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in server.upscalers()[0]]

    @app.get(f"{api}/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        return [{"name": m.name, "cmd_dir": None, "architecture": m.architecture} for m in server.face_restorers()]

    @app.get(f"{api}/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in server.styles.values()]

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
                "queue_size": config.queue_size, "max_body_bytes": config.max_body_bytes,
                "styles_file": str(config.styles_file) if config.styles_file else None}

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


#: How often a queued or running job looks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


async def _run_job(request: Any, queue: Any, function: Any, *args: Any) -> Any:
    """:func:`_run_blocking` for a job holding the queue ticket ``args[-1]``; when the client closes
    its connection, the job is given up (:meth:`JobQueue.abandon`): not run when it was waiting,
    stopped at its next step when it was running. Its answer then goes nowhere."""
    import asyncio

    from aipaint.serve.jobs import ClientGone

    task = asyncio.ensure_future(_run_blocking(function, *args))
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            queue.abandon(args[-1])
            break
    try:
        return await task
    except ClientGone:
        from starlette.responses import Response

        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="info")


__all__ = ["ServerConfig", "create_app", "serve"]
