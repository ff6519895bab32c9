"""The FastAPI application: the native API (``/controldiff/v1``), A1111's (``/sdapi/v1``), the web page.

Both APIs turn a request into the native request and parse it (:func:`controldiff.request.parse`:
every field checked, every name resolved inside the configured folders, before any model is
touched), then queue it (:mod:`.jobs`). A request the server refuses is HTTP 422
``{"detail": [{"loc": [field path], "msg": ...}]}``, the path in the API's own field names.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import demo
from . import a1111, library
from .config import ServerConfig
from .jobs import Job, JobStore, Worker
from .security import Guard, check_uploads

__all__ = ["create_app", "Refused"]

NATIVE = "/controldiff/v1"
OUTPUTS_URL = f"{NATIVE}/outputs"
STATIC = Path(__file__).parent / "static"


class Refused(Exception):
    """A request the server will not run: ``loc`` is the field's path, ``message`` why."""

    def __init__(self, loc, message: str, status: int = 422):
        super().__init__(message)
        self.loc, self.message, self.status = list(loc), message, status


def _loc(field: str) -> list:
    """``"controls.1.scale"`` -> ``["controls", 1, "scale"]``."""
    return [int(p) if p.isdigit() else p for p in field.split(".")] if field else []


class Server:
    """What the routes share: the config, the folders names resolve in, the jobs, A1111's options."""

    def __init__(self, config: ServerConfig):
        from ..outputs import plan
        from ..request import Limits

        config.check()
        self.config = config
        self.limits = Limits(max_pixels=config.max_pixels, max_images=config.max_images)
        self.folders = library.ConfinedFolders(
            models=list(config.models), loras=list(config.loras), embeddings=list(config.embeddings),
            controlnets=list(config.controlnets), default_model=config.model)
        self.outputs = plan(str(config.outputs).rstrip("/\\") + os.sep, 1, flag="--outputs")
        self.store = JobStore(keep=config.keep_jobs)
        self.workers = [Worker(self.store, d, config.dtype, self.outputs, OUTPUTS_URL, config.preview_every)
                        for d in config.devices]
        self.default_title = config.model.name if config.model is not None else demo.NAME
        self.options: dict[str, Any] = {"sd_model_checkpoint": self.default_title, "CLIP_stop_at_last_layers": 1,
                                        "samples_format": "png", "outdir_samples": ""}

    # ---- the one way in
    def check_uploads(self, data: Any) -> None:
        """A1111 bodies: their images within the pixel limit before the mapping decodes them (the
        native parse checks its own)."""
        found = check_uploads(data, self.config.max_pixels)
        if found is not None:
            raise Refused(found[0], found[1])

    def parse(self, data: dict, to_loc=_loc):
        from ..request import RequestError, parse

        try:
            return parse(data, folders=self.folders, limits=self.limits)
        except RequestError as e:
            field = getattr(e, "field", "") or ""
            message = getattr(e, "message", None) or str(e)
            raise Refused(to_loc(field), message) from None

    def submit(self, request, keep_pngs: bool = False) -> Job:
        return self.store.submit(Job(request, len(request.seeds), keep_pngs=keep_pngs))

    def names(self, kind: str) -> list[str]:
        """What requests may name: "models", "loras", "embeddings", "controlnets"."""
        return self.folders.names(kind)


def create_app(config: ServerConfig) -> FastAPI:
    """The application for ``config`` (its workers start with the app and stop with it)."""
    server = Server(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for w in server.workers:
            w.start()
        yield
        for j in list(server.store.jobs.values()):
            server.store.cancel(j)
        server.store.queue.put(None)
        for w in server.workers:
            await run_in_threadpool(w.join, 10)

    app = FastAPI(title="controldiff", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"detail": [{"loc": e.loc, "msg": e.message, "type": "value_error"}]},
                            status_code=e.status)

    _native_routes(app, server)
    _a1111_routes(app, server)
    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    app.add_middleware(Guard, token=config.token, max_body=config.max_upload_bytes)
    return app


def _job_or_404(server: Server, job_id: str) -> Job:
    job = server.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def _native_routes(app: FastAPI, server: Server) -> None:
    from ..schedulers import NAMES

    @app.get(f"{NATIVE}/schema")
    def schema():
        from ..request import schema

        return schema()

    def lister(kind):
        return lambda: server.names(kind)

    for kind in ("models", "loras", "embeddings", "controlnets"):
        app.get(f"{NATIVE}/{kind}", name=kind)(lister(kind))

    @app.get(f"{NATIVE}/samplers")
    def samplers():
        return list(NAMES)

    @app.post(f"{NATIVE}/jobs")
    def submit(data: Any = Body(...)):
        if not isinstance(data, dict):
            raise Refused([], "expected a JSON object (a request)")
        return {"id": server.submit(server.parse(data)).id}

    @app.get(f"{NATIVE}/jobs/{{job_id}}")
    def job(job_id: str):
        return _job_or_404(server, job_id).describe(OUTPUTS_URL)

    @app.post(f"{NATIVE}/jobs/{{job_id}}/cancel")
    def cancel(job_id: str):
        j = _job_or_404(server, job_id)
        server.store.cancel(j)
        return j.describe(OUTPUTS_URL)

    @app.get(OUTPUTS_URL)
    def outputs(limit: int = 200):
        return library.gallery(server.config.outputs, OUTPUTS_URL, limit=max(1, min(limit, 10000)))

    @app.get(f"{OUTPUTS_URL}/{{name}}")
    def output(name: str):
        try:
            path = library.output_file(server.config.outputs, name)
        except FileNotFoundError:
            raise HTTPException(404, f"no image {name!r}") from None
        return FileResponse(path, media_type="image/png")


def _a1111_routes(app: FastAPI, server: Server) -> None:
    base = "/sdapi/v1"

    async def generate(body: Any, mode: str):
        if not isinstance(body, dict):
            raise Refused([], "expected a JSON object")
        server.check_uploads(body)

        def prepare():
            try:
                native = a1111.to_native(body, mode, server.options, server.default_title)
            except a1111.FieldError as e:
                raise Refused(e.loc, e.message) from None
            units = a1111.split_locations(native)
            request = server.parse(native, lambda field: a1111.native_to_a1111_loc(field, units))
            return request, server.submit(request, keep_pngs=True)

        request, job = await run_in_threadpool(prepare)
        try:
            await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # the client left: the job goes on (its images are saved), unheld
            job.keep_pngs, job.pngs = False, []
            raise
        if job.state == "failed":
            return JSONResponse({"error": "GenerationError", "detail": job.error, "errors": job.error},
                                status_code=500)
        out = a1111.response(body, job, request, send_images=body.get("send_images", True) is not False)
        job.pngs = []  # answered: the images live on in the outputs folder
        return out

    @app.post(f"{base}/txt2img")
    async def txt2img(body: Any = Body(...)):
        return await generate(body, "txt2img")

    @app.post(f"{base}/img2img")
    async def img2img(body: Any = Body(...)):
        return await generate(body, "img2img")

    @app.get(f"{base}/progress")
    def progress(skip_current_image: bool = False):
        return a1111.progress(server.store.last, skip_current_image)

    @app.post(f"{base}/interrupt")
    def interrupt():
        for j in server.store.running():
            server.store.cancel(j)
        return {}

    @app.get(f"{base}/options")
    def get_options():
        return dict(server.options)

    @app.post(f"{base}/options")
    def set_options(body: Any = Body(...)):
        if not isinstance(body, dict):
            raise Refused([], "expected a JSON object of option -> value")
        if "sd_model_checkpoint" in body:
            name = a1111.strip_hash(body["sd_model_checkpoint"] or "")
            if name != server.default_title and name not in server.names("models"):
                raise Refused(["sd_model_checkpoint"], f"unknown model {name!r}; one of: "
                              + ", ".join([server.default_title, *server.names("models")]))
            body = {**body, "sd_model_checkpoint": name}
        v = body.get("CLIP_stop_at_last_layers", 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise Refused(["CLIP_stop_at_last_layers"], f"expected a positive integer, got {v!r}")
        server.options.update(body)
        return None

    @app.get(f"{base}/sd-models")
    def sd_models():
        names = [server.default_title] + [n for n in server.names("models") if n != server.default_title]
        return [{"title": n, "model_name": Path(n).stem if Path(n).suffix in (".safetensors", ".ckpt") else n,
                 "hash": None, "sha256": None, "filename": n, "config": None} for n in names]

    @app.post(f"{base}/refresh-checkpoints")
    def refresh_checkpoints():
        return None  # listed afresh on every call

    @app.get(f"{base}/samplers")
    def samplers():
        return a1111.sampler_list()

    @app.get(f"{base}/schedulers")
    def schedulers():
        return a1111.scheduler_list()

    @app.get(f"{base}/loras")
    def loras():
        return [{"name": n, "alias": n, "path": _relative(server.folders.find("loras", n), server.config.loras),
                 "metadata": {}} for n in server.names("loras")]

    @app.get(f"{base}/embeddings")
    def embeddings():
        return {"loaded": {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                               "vectors": None} for n in server.names("embeddings")},
                "skipped": {}}

    @app.get(f"{base}/scripts")
    def scripts():
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @app.post(f"{base}/png-info")
    def png_info(body: Any = Body(...)):
        from ..png import parse_parameters

        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise Refused(["image"], "expected a base64 PNG or data URL")
        server.check_uploads(body)
        try:
            im = a1111._image(body["image"], ("image",))
        except a1111.FieldError as e:
            raise Refused(e.loc, e.message) from None
        text = dict(getattr(im, "text", None) or {})
        info = text.pop("parameters", None) or im.info.get("parameters") or ""
        items = {k: v for k, v in im.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": info, "items": items, "parameters": parse_parameters(info) if info else {}}

    # sd-webui-controlnet's own routes, as webuiapi's ControlNet helpers call them
    @app.get("/controlnet/model_list")
    def controlnet_models():
        return {"model_list": server.names("controlnets")}

    @app.get("/controlnet/module_list")
    def controlnet_modules():
        return {"module_list": ["none"], "module_detail": {}}

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": 2}


def _relative(path: Path, folders) -> str:
    """``path`` inside the folder of ``folders`` it was found in (no server paths shown)."""
    root = next((Path(f) for f in folders if path.is_relative_to(f)), path.parent)
    return path.relative_to(root).as_posix()
