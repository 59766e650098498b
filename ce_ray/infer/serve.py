"""`ce-ray serve`: a trained generator on Ray Serve: HTTP API, dynamic batching, limits, web page.

The HTTP API, dynamic batching across requests, input limits, and the web page. Inpainting itself
(any size, any hole) is planner.py.

    ce-ray serve --model URI [--host 127.0.0.1 --port 8000 --replicas N]   blocks until Ctrl-C
    ce-ray serve --host 0.0.0.0 --api-key-file PATH ...   exposed: every client needs the key
    serve run cluster/serve.yaml          or    CE_RAY_MODEL=URI serve run ce_ray.infer.serve:app

API key: a server bound to anything but a loopback address refuses to start without one
(--api-key-file PATH or $CE_RAY_API_KEY; for the Serve-config app $CE_RAY_API_KEY_FILE or
$CE_RAY_API_KEY) unless --insecure-no-auth ($CE_RAY_INSECURE_NO_AUTH=1) says so on purpose. With a
key (on loopback too, when one is given) every request but GET /healthz and GET / (the page: static,
no data; it asks for the key and sends it on its own calls) needs `Authorization: Bearer <key>`,
else a 401 JSON body. Replicas get only the key's SHA-256, never the key itself.

Routes
    POST /v1/inpaint   multipart: image (PNG/JPEG, any size), optional mask (white = hole; default
                       the centre region), optional model (an id from /v1/models; or Serve's
                       `serve_multiplexed_model_id` header; default the first), optional method
                       (model | telea | navier_stokes | biharmonic | harmonic: a classical fill of
                       the same hole, for comparison) -> image/png. Every pixel outside the hole
                       is unchanged. Headers: X-Ce-Ray-Model, X-Ce-Ray-Windows (model windows
                       used), X-Ce-Ray-Batch (requests that shared the forward), Server-Timing
                       (decode, batch, model, encode ms).
    GET  /healthz      {"status": "ok", ...}
    GET  /v1/models    the models this app serves, which are loaded in the answering replica
    GET  /v1/model     name, version, training config, val metrics, limits, batching (?model=ID)
    GET  /             the web page (ce_ray/static/index.html; no external resources)

Several models: each replica loads a model on first use into an LRU of `max_models_per_replica`
(`serve.multiplexed`), and a batch never mixes models (requests are grouped by model before the
forward). Autoscaling: `--min-replicas / --max-replicas / --target-ongoing-requests` become the
deployment's autoscaling_config.
Bad requests get a 4xx JSON body {"error": <code>, "detail": <what is wrong>}; the replica keeps serving.

Batching: `@serve.batch` gathers up to max_batch_size requests (waiting at most batch_wait_ms after
the first); every round of every request's windows then runs as one generator forward. Both knobs
come from the deployment's user_config, so `serve deploy` with new values calls `reconfigure` on
the running replicas without restarting them.

Upload limit: Serve's proxy has no body limit of its own (docs/ray-notes.md, "Serve"), so the
replica refuses a body whose Content-Length is over the limit before reading any of it, and counts
the bytes of a body sent without one.
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the methods, and FastAPI
# then cannot resolve string annotations such as `request: Request` (it took them for query params).
import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from ce_ray.errors import UserError
from ce_ray.infer.shipped import DEFAULT_MODEL

if TYPE_CHECKING:
    from ce_ray.infer.planner import FullPlan, Plan
    from ce_ray.infer.resolve import LoadedGenerator

APP_NAME = "ce-ray"
DEPLOYMENT_NAME = "Inpainter"
STATIC_DIR = Path(__file__).parent / "static"

DEFAULT_MAX_BATCH_SIZE = 8  # CPU: per-image forward cost drops ~2.2x from batch 1 to 8 (bench/serve_load.py)
DEFAULT_BATCH_WAIT_MS = 5.0  # added to a lone request's latency; long enough to gather a burst
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 25_000_000  # ~25 MP: a decoded RGB image of 75 MB, plus its mask
INLINE_CODEC_BYTES = 256 * 1024  # uploads up to this size decode on the event loop (see inpaint())
INLINE_CODEC_PIXELS = 256 * 256  # results up to this size encode on the event loop
MAX_ONGOING_REQUESTS = 64  # per replica; must be >= max_batch_size (Serve's batching queue lives inside it)

DEFAULT_MAX_MODELS_PER_REPLICA = 3  # serve.multiplexed's LRU size per replica
METHODS = ("model", "telea", "navier_stokes", "biharmonic", "harmonic")  # `method` form field
# Autoscaling defaults (used when --max-replicas > --min-replicas): Serve's own upscale delay,
# and a downscale delay shorter than Serve's 600 s so an idle CPU box gives its cores back.
DEFAULT_TARGET_ONGOING_REQUESTS = 4.0
DEFAULT_UPSCALE_DELAY_S = 30.0
DEFAULT_DOWNSCALE_DELAY_S = 120.0

# Replica health checks. When a replica's process dies, its in-flight requests fail at once (500
# from the proxy) and the proxy holds later requests until a replacement is up; the controller
# starts that replacement only when its next health check finds the replica dead. Serve's 10 s
# period made recovery after a SIGKILL under load 7-14 s (6 runs) on a shared 2-core machine, 2 s
# made it 5-7 s (5 runs; bench/serve_fault.py); the check is a no-op call on the replica's event loop.
# The timeout stays Serve's 30 s: a live replica that is only slow (a loaded CPU) must not be killed.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0

# InpaintError codes -> HTTP status. Anything not listed is a 400.
STATUS = {
    "payload_too_large": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "unsupported_media_type": 415,
    "length_required": 411,
    "unknown_model": 404,
}


def model_id_for(uri: str) -> str:
    """The id a model URI is served under: models:/NAME/VERSION -> NAME-vVERSION, models:/NAME@ALIAS
    -> NAME@ALIAS, runs:/ID/PATH -> ID, a folder or file -> its name."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        if "@" in rest:
            return rest
        name, _, version = rest.partition("/")
        return f"{name}-v{version}" if version else name
    if uri.startswith("runs:/"):
        return uri[len("runs:/") :].split("/", 1)[0]
    return Path(uri.rstrip("/")).name or uri


def model_table(uris: list[str]) -> dict[str, str]:
    """{id: uri}, in the given order (the first is the default); ids made unique with -2, -3..."""
    out: dict[str, str] = {}
    for uri in uris:
        base = model_id_for(uri)
        mid, n = base, 2
        while mid in out:
            mid, n = f"{base}-{n}", n + 1
        out[mid] = uri
    return out


def error_response(code: str, detail: str, status: int | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status or STATUS.get(code, 400))


def describe_model(uri: str, loaded: "LoadedGenerator") -> dict[str, Any]:
    """Name and version of a model URI (MLflow registry, run, or checkpoint directory), plus what the
    checkpoint says about itself."""
    from ce_ray import tracking
    from ce_ray.config import to_dict

    name, version = uri, str(loaded.step)
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        name, sep, ref = rest.partition("@") if "@" in rest else rest.partition("/")
        version = ref if sep == "/" and ref.isdigit() else f"{sep}{ref}"
        if not ref.isdigit() and (sep == "@" or ref.lower() == "latest"):
            # An alias or "latest": say which version that was at load time (the registry may be
            # unreachable after the download: then keep the reference).
            version = tracking.registered_version(name, alias=ref if sep == "@" else None) or version
    elif uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/") :].partition("/")
        name, version = path or "run", run_id
    elif uri == DEFAULT_MODEL:
        name = "ce-ray free-form (shipped with the package)"
    else:
        name = Path(uri).expanduser().resolve().name
    return {
        "name": name,
        "version": version,
        "source": uri,
        "step": loaded.step,
        "variant": loaded.config.model.variant,
        "config": to_dict(loaded.config),
        "metrics": loaded.metrics,
    }


# --- API key ---------------------------------------------------------------------------------------

API_KEY_ENV = "CE_RAY_API_KEY"
API_KEY_FILE_ENV = "CE_RAY_API_KEY_FILE"  # the Serve-config app's --api-key-file
INSECURE_ENV = "CE_RAY_INSECURE_NO_AUTH"  # the Serve-config app's --insecure-no-auth ("1")
OPEN_PATHS = ("/healthz", "/", "")  # probes, and the page (static; it asks for the key itself)


CLI_WAYS_OUT = ("--api-key-file PATH", f"the {API_KEY_ENV} environment variable", "--insecure-no-auth")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it counts as exposed
        return False


def read_api_key_file(path: str) -> str:
    """The key in a file (a mounted secret, say), without surrounding whitespace (a trailing newline)."""
    try:
        key = Path(path).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not key:
        raise UserError(f"the API key file {path} is empty: put the key in it (one line)")
    return key


def resolve_api_key(
    host: str,
    key_file: str | None,
    env_key: str | None,
    insecure: bool,
    names: tuple[str, str, str] = CLI_WAYS_OUT,
) -> str | None:
    """The API key the server enforces (the file first, else the env var), or None: no key is
    allowed only on a loopback host or with `insecure`. `names`: how the three ways out are spelled
    in the refusal (CLI flags, or the Serve-config app's env vars)."""
    if key_file:
        return read_api_key_file(key_file)
    if env_key is not None and env_key.strip():
        return env_key.strip()
    if is_loopback(host) or insecure:
        return None
    raise UserError(
        f"refusing to serve on {host}, which is not a loopback address, without an API key: anyone who can "
        f"reach it could use this server. Either give a key ({names[0]}, or {names[1]}; clients then send "
        f"'Authorization: Bearer <key>'), bind a loopback address (127.0.0.1), or pass {names[2]} to serve "
        "without authentication on purpose"
    )


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class BearerAuth:
    """ASGI middleware: with a key set, every request but OPEN_PATHS needs `Authorization: Bearer
    <key>` (compared in constant time), else 401 JSON. In front of every route, present or future."""

    # The key's digest for the replica in this process, set by Inpainter.__init__. Serve runs a
    # frozen copy of `api` and ships Inpainter by value (its __init__ then writes a copy of this
    # module's globals), so the one object both sides reach is this class, which pickles by
    # reference. One replica per actor process: one value per replica.
    key_sha256: str | None = None

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        digest = BearerAuth.key_sha256
        if digest is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # the route prefix (e.g. /t-serve) is not part of the route
            path = path[len(root) :]
        if path in OPEN_PATHS and scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and given.strip():
            if hmac.compare_digest(key_digest(given.strip()), digest):
                await self.app(scope, receive, send)
                return
            code, detail = "invalid_api_key", "the API key is not valid"
        else:
            code, detail = "missing_api_key", "this server needs an API key: send 'Authorization: Bearer <key>'"
        reply = JSONResponse({"error": code, "detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await reply(scope, receive, send)


api = FastAPI(
    title="ce-ray", description="Context Encoder inpainting (Pathak et al. 2016)", docs_url=None, redoc_url=None
)
api.add_middleware(BearerAuth)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not the client's fault: a JSON body like every other error; the replica goes on serving.
    logging.getLogger("ce_ray.infer.serve").exception("unhandled error on %s", request.url.path)
    return error_response(
        "internal_error", f"the server failed on this request ({type(exc).__name__}); see the replica log", 500
    )


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
)
@serve.ingress(api)
class Inpainter:
    """One replica: the generator on its device, the limits, and the batching queue."""

    def __init__(
        self,
        model_uri: str = "",
        max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "auto",
        threads: int = 0,
        tracking_uri: str | None = None,
        models: dict[str, str] | None = None,
        max_models_per_replica: int = DEFAULT_MAX_MODELS_PER_REPLICA,
        api_key_sha256: str | None = None,
    ):
        import torch

        BearerAuth.key_sha256 = api_key_sha256  # enforced in front of every route (None: no key)

        from ce_ray.core.step import resolve_device

        if tracking_uri:  # the replica is another process: it does not inherit the driver's mlflow.set_tracking_uri
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        if threads:
            torch.set_num_threads(threads)
        self.models = dict(models) if models else model_table([model_uri])
        self.default_model = next(iter(self.models))
        self._device = resolve_device(device)
        self.device = str(self._device)
        self.max_models_per_replica = int(max_models_per_replica)
        try:
            # serve.multiplexed fixes its LRU size where the method is decorated; the wrapper it
            # creates on first use is made here instead, with this app's size.
            from ray.serve.multiplex import _ModelMultiplexWrapper

            setattr(
                self,
                "__serve_multiplex_wrapper",
                _ModelMultiplexWrapper(type(self).get_model.__wrapped__, self, self.max_models_per_replica),
            )
        except (ImportError, AttributeError, TypeError):  # another Ray version: the decorator's default size
            pass
        self.max_upload_bytes, self.max_pixels = int(max_upload_bytes), int(max_pixels)
        self.page_html = (STATIC_DIR / "index.html").read_text()
        self.batching = {"max_batch_size": DEFAULT_MAX_BATCH_SIZE, "batch_wait_ms": DEFAULT_BATCH_WAIT_MS}
        self.replica = serve.get_replica_context().replica_id.unique_id  # which replica answered (healthz)
        # The default model loads now: a bad URI fails the deployment at start, not a request.
        self._first: tuple[LoadedGenerator, dict[str, Any]] | None = self._load_sync(self.default_model)
        self.info = self._first[1]  # the default model's description (healthz)

    def _load_sync(self, model_id: str) -> "tuple[LoadedGenerator, dict[str, Any]]":
        from ce_ray.infer.resolve import load_generator

        loaded = load_generator(self.models[model_id], self._device)
        return loaded, {"id": model_id, **describe_model(self.models[model_id], loaded)}

    @serve.multiplexed(max_num_models_per_replica=DEFAULT_MAX_MODELS_PER_REPLICA)  # type: ignore[untyped-decorator]  # ray: untyped
    async def get_model(self, model_id: str) -> "tuple[LoadedGenerator, dict[str, Any]]":
        """(LoadedGenerator, description) of one served model, loaded on first use; the least
        recently used one is dropped when this replica holds max_models_per_replica."""
        if self._first is not None and self._first[1]["id"] == model_id:
            first, self._first = self._first, None  # loaded in __init__: hand it to the LRU
            return first
        return await asyncio.to_thread(self._load_sync, model_id)

    def loaded_models(self) -> list[str]:
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        loaded = list(wrapper.models) if wrapper is not None else []
        if self._first is not None:
            loaded.append(self._first[1]["id"])
        return loaded

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called by Serve at start and whenever user_config changes (no restart)."""
        known = {"max_batch_size", "batch_wait_ms"}
        unknown = set(user_config) - known
        if unknown:
            raise UserError(f"unknown user_config key(s) {sorted(unknown)}; valid: {sorted(known)}")
        size = int(user_config.get("max_batch_size", self.batching["max_batch_size"]))
        wait = float(user_config.get("batch_wait_ms", self.batching["batch_wait_ms"]))
        if size < 1 or size > MAX_ONGOING_REQUESTS or wait < 0:
            raise UserError(
                f"user_config needs 1 <= max_batch_size <= {MAX_ONGOING_REQUESTS} and batch_wait_ms >= 0, "
                f"got {user_config}"
            )
        # serve.batch's wrapper has these setters; its annotations describe only the call
        self._inpaint_batch.set_max_batch_size(size)  # type: ignore[attr-defined]
        self._inpaint_batch.set_batch_wait_timeout_s(wait / 1000.0)  # type: ignore[attr-defined]
        self.batching = {"max_batch_size": size, "batch_wait_ms": wait}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_MS / 1000.0)
    async def _inpaint_batch(self, items: "list[tuple[str, Plan | FullPlan]]") -> list[tuple[np.ndarray, int, float]]:
        """Several requests' (model id, plan) -> [(result, how many requests shared its forward,
        that forward's model time in ms)]. Requests for different models never share a forward:
        Serve splits batches by the multiplexed-model header, and requests that chose their model
        in the form are grouped here."""
        from ce_ray.infer.planner import inpaint_many

        groups: dict[str, list[int]] = {}
        for i, (model_id, _) in enumerate(items):
            groups.setdefault(model_id, []).append(i)
        out: list[Any] = [None] * len(items)
        for model_id, idx in groups.items():
            loaded, _ = await self.get_model(model_id)
            # In a thread: the event loop keeps accepting (and decoding) the next requests meanwhile.
            t = time.perf_counter()
            results = await asyncio.to_thread(inpaint_many, loaded, [items[i][1] for i in idx])
            ms = (time.perf_counter() - t) * 1e3
            for i, r in zip(idx, results):
                out[i] = (r, len(idx), ms)
        return out

    def _model_id(self, request: Request, form_value: str | None) -> str | JSONResponse:
        """The form's `model`, else Serve's multiplexed-model header, else the default."""
        chosen = (
            form_value
            or request.headers.get("serve_multiplexed_model_id")
            or serve.get_multiplexed_model_id()
            or self.default_model
        )
        if chosen not in self.models:
            return JSONResponse(
                {
                    "error": "unknown_model",
                    "detail": f"no model {chosen!r} here; GET /v1/models lists them",
                    "models": list(self.models),
                },
                status_code=404,
            )
        return chosen

    async def _read_body(self, request: Request) -> bytes | JSONResponse:
        """The body, or a 413 without reading it when Content-Length is over the limit."""
        limit = self.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response("bad_request", f"invalid Content-Length {length!r}")
            if int(length) > limit:
                return error_response(
                    "payload_too_large",
                    f"the upload is {int(length)} bytes; the limit is {limit} bytes ({limit / 2**20:g} MB)",
                )
        chunks, size = [], 0
        async for chunk in request.stream():  # no (or a lying) Content-Length: count as it arrives
            size += len(chunk)
            if size > limit:
                return error_response(
                    "payload_too_large", f"the upload is over the limit of {limit} bytes ({limit / 2**20:g} MB)"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    @api.post("/v1/inpaint")
    async def inpaint(self, request: Request) -> Response:
        from ce_ray.core.masks import hole_from_image
        from ce_ray.data.images import encode_png, open_image, to_rgb8
        from ce_ray.errors import InpaintError
        from ce_ray.infer.planner import plan

        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error_response(
                "unsupported_media_type",
                "send multipart/form-data with an 'image' file field (and optionally 'mask'), "
                f"not {ctype or 'no Content-Type'!r}",
            )
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        request._body = body  # starlette's form parser reads the buffered body from here
        try:
            form = await request.form(max_files=2, max_fields=4, max_part_size=self.max_upload_bytes)
        except Exception as e:  # HTTPException / MultiPartException: malformed multipart
            return error_response("bad_multipart", f"could not parse the multipart body: {getattr(e, 'detail', e)}")
        try:
            image_field, mask_field = form.get("image"), form.get("mask")
            model_field, method = form.get("model"), form.get("method") or "model"
            if not isinstance(model_field, (str, type(None))) or not isinstance(method, str):
                return error_response("bad_field", "'model' and 'method' are text fields")
            if method not in METHODS:
                return error_response("bad_method", f"method {method!r} is not one of {', '.join(METHODS)}")
            model_id = self._model_id(request, model_field)
            if isinstance(model_id, Response):
                return model_id
            if image_field is None or isinstance(image_field, str):
                return error_response(
                    "missing_image", "no 'image' file in the form: upload the photo as the 'image' field"
                )
            image_bytes = await image_field.read()
            mask_bytes = None
            if mask_field is not None and not (isinstance(mask_field, str) and mask_field == ""):
                if isinstance(mask_field, str):
                    return error_response("bad_mask", "'mask' must be an image file upload (white = hole)")
                mask_bytes = await mask_field.read()
        finally:
            await form.close()

        loaded, info = await self.get_model(model_id)  # its geometry plans the windows

        def decode_and_plan() -> "Plan | FullPlan":
            rgb = to_rgb8(open_image(image_bytes, self.max_pixels, "image"))
            hole = (
                hole_from_image(open_image(mask_bytes, self.max_pixels, "mask"), rgb.shape[:2])
                if mask_bytes is not None
                else None
            )
            return plan(loaded, rgb, hole)

        # Big images decode and encode in a thread so the event loop keeps feeding the batch queue;
        # small ones inline, where a thread hand-off would cost more than the work (~1 ms at 128x128).
        big = len(image_bytes) + len(mask_bytes or b"") > INLINE_CODEC_BYTES
        t0 = time.perf_counter()
        try:
            p = await asyncio.to_thread(decode_and_plan) if big else decode_and_plan()
        except InpaintError as e:
            return error_response(e.code, str(e))
        t1 = time.perf_counter()
        if method == "model":
            out, batch, model_ms = await self._inpaint_batch((model_id, p))
        else:  # a classical fill of exactly the same hole: what the user would get without the model
            from ce_ray.core.baselines import inpaint_image

            t = time.perf_counter()
            out = await asyncio.to_thread(inpaint_image, method, p.rgb, p.hole)
            batch, model_ms = 1, (time.perf_counter() - t) * 1e3
        t2 = time.perf_counter()
        png = await asyncio.to_thread(encode_png, out) if big or out.size > 3 * INLINE_CODEC_PIXELS else encode_png(out)
        t3 = time.perf_counter()
        # Diagnostics for clients and bench/serve_load.py: model windows used, requests batched
        # together, and where the time went (Server-Timing: browsers' dev tools show it).
        timing = (
            f"decode;dur={(t1 - t0) * 1e3:.1f}, batch;dur={(t2 - t1) * 1e3:.1f}, model;dur={model_ms:.1f}, "
            f"encode;dur={(t3 - t2) * 1e3:.1f}"
        )
        return Response(
            content=png,
            media_type="image/png",
            headers={
                "X-Ce-Ray-Windows": str(len(p.windows)) if method == "model" else "0",
                "X-Ce-Ray-Batch": str(batch),
                "X-Ce-Ray-Model": model_id if method == "model" else method,
                "Server-Timing": timing,
            },
        )

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.info["name"], "version": self.info["version"], "replica": self.replica}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        loaded = self.loaded_models()
        return {
            "default": self.default_model,
            "max_models_per_replica": self.max_models_per_replica,
            "replica": self.replica,
            "methods": list(METHODS),
            "models": [
                {"id": mid, "uri": uri, "default": mid == self.default_model, "loaded_here": mid in loaded}
                for mid, uri in self.models.items()
            ],
        }

    @api.get("/v1/model")
    async def model(self, model: str | None = None) -> Response:
        from ce_ray.infer import planner as I

        mid = model or self.default_model
        if mid not in self.models:
            return JSONResponse(
                {
                    "error": "unknown_model",
                    "detail": f"no model {mid!r} here; GET /v1/models lists them",
                    "models": list(self.models),
                },
                status_code=404,
            )
        _, info = await self.get_model(mid)
        return JSONResponse(
            {
                **info,
                "device": self.device,
                "batching": self.batching,
                "limits": {
                    "max_upload_bytes": self.max_upload_bytes,
                    "max_pixels": self.max_pixels,
                    "max_hole_fraction": I.MAX_HOLE_FRACTION,
                    "max_windows": I.MAX_WINDOWS,
                    "max_downscale": I.MAX_DOWNSCALE,
                },
            }
        )

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)


def _gpus_available() -> bool:
    import ray

    if ray.is_initialized():
        gpus: float = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call]  # ray: untyped
        return gpus > 0
    import torch

    return torch.cuda.is_available()


def build_app(
    model_uri: str | list[str],
    *,
    replicas: int = 1,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float | None = None,
    device: str = "auto",
    threads: int = 0,
    tracking_uri: str | None = None,
    max_models_per_replica: int = DEFAULT_MAX_MODELS_PER_REPLICA,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float = DEFAULT_TARGET_ONGOING_REQUESTS,
    upscale_delay_s: float = DEFAULT_UPSCALE_DELAY_S,
    downscale_delay_s: float = DEFAULT_DOWNSCALE_DELAY_S,
    look_back_period_s: float = 30.0,
    api_key: str | None = None,
) -> serve.Application:
    """The Serve application (pass to serve.run). `model_uri`: one URI or several (the first is the
    default; each request may choose another). gpus_per_replica None = 1 when the cluster (or,
    before ray.init, this machine) has a GPU, else 0. min/max_replicas: autoscale between them
    (target_ongoing_requests per replica) instead of a fixed `replicas`. api_key: every request but
    /healthz and the page needs `Authorization: Bearer <api_key>` (see resolve_api_key for when one
    is required); only its SHA-256 reaches the replicas."""
    uris = [model_uri] if isinstance(model_uri, str) else list(model_uri)
    if not uris or not all(uris):
        raise UserError("no model: pass --model URI (or set CE_RAY_MODEL for `serve run ce_ray.infer.serve:app`)")
    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    if not 1 <= max_batch_size <= MAX_ONGOING_REQUESTS:
        raise UserError(f"--max-batch-size must be in [1, {MAX_ONGOING_REQUESTS}], got {max_batch_size}")
    if batch_wait_ms < 0 or max_upload_mb <= 0 or max_pixels < 1:
        raise UserError("--batch-wait-ms must be >= 0, --max-upload-mb > 0 and --max-pixels >= 1")
    if max_models_per_replica < 1:
        raise UserError(f"--max-models-per-replica must be >= 1, got {max_models_per_replica}")
    autoscaling = None
    if min_replicas is not None or max_replicas is not None:
        lo = replicas if min_replicas is None else min_replicas
        hi = max(lo, replicas) if max_replicas is None else max_replicas
        if lo < 0 or hi < 1 or hi < lo:
            raise UserError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {lo} and {hi}")
        if target_ongoing_requests <= 0:
            raise UserError(f"--target-ongoing-requests must be > 0, got {target_ongoing_requests}")
        autoscaling = {
            "min_replicas": lo,
            "max_replicas": hi,
            "initial_replicas": max(lo, 1),
            "target_ongoing_requests": target_ongoing_requests,
            "upscale_delay_s": upscale_delay_s,
            "downscale_delay_s": downscale_delay_s,
            "look_back_period_s": look_back_period_s,
        }
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if device != "cpu" and _gpus_available() else 0.0
    if any(u.startswith(("models:/", "runs:/")) for u in uris):
        from ce_ray.infer.resolve import store_for

        tracking_uri = store_for(tracking_uri)  # flag, else env, else outputs/mlflow.db: made explicit for replicas
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "user_config": {"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms},
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    # serve.deployment made Inpainter a Deployment; its annotations keep the class
    app: serve.Application = Inpainter.options(**options).bind(  # type: ignore[attr-defined]
        models=model_table(uris),
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        device=device,
        threads=threads,
        tracking_uri=tracking_uri,  # "auto" resolves in the replica: cuda iff it got a GPU
        max_models_per_replica=max_models_per_replica,
        api_key_sha256=key_digest(api_key) if api_key else None,
    )
    return app


def parse_models(models: list[str] | None, registry_models: str | None) -> list[str]:
    """--model URI (repeatable) and --models name@alias,name/3,... -> URIs, in order."""
    uris = list(models or [])
    for item in (registry_models or "").split(","):
        item = item.strip()
        if item:
            uris.append(item if item.startswith(("models:/", "runs:/")) else f"models:/{item}")
    return uris or [DEFAULT_MODEL]  # no model named: the one ce-ray ships


def app_from_env() -> serve.Application:
    """`serve run ce_ray.infer.serve:app` / cluster/serve.yaml: the app configured by environment variables
    (CE_RAY_MODEL: one URI or several, comma-separated, default the shipped model; CE_RAY_MAX_UPLOAD_MB,
    CE_RAY_MAX_PIXELS, CE_RAY_DEVICE optional; the API key from CE_RAY_API_KEY_FILE or CE_RAY_API_KEY,
    required when Serve's HTTP host is not loopback unless CE_RAY_INSECURE_NO_AUTH=1).
    Replicas, resources and batching then come from the Serve config's deployment section."""
    env = os.environ
    uris = [u.strip() for u in env.get("CE_RAY_MODEL", "").split(",") if u.strip()]  # several: comma-separated
    key = resolve_api_key(
        _serve_http_host(),
        env.get(API_KEY_FILE_ENV) or None,
        env.get(API_KEY_ENV),
        env.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes"),
        names=(f"{API_KEY_FILE_ENV}=PATH", f"{API_KEY_ENV}", f"{INSECURE_ENV}=1"),
    )
    return build_app(
        uris or DEFAULT_MODEL,
        max_upload_mb=float(env.get("CE_RAY_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)),
        max_pixels=int(env.get("CE_RAY_MAX_PIXELS", DEFAULT_MAX_PIXELS)),
        device=env.get("CE_RAY_DEVICE", "auto"),
        gpus_per_replica=float(env["CE_RAY_GPUS"]) if "CE_RAY_GPUS" in env else None,
        api_key=key,
    )


def _serve_http_host() -> str:
    """The host Serve's proxies bind: the running controller's, else Serve's default (127.0.0.1:
    `serve run module:app` builds the app before it starts Serve with its defaults)."""
    import ray

    if ray.is_initialized():  # never start a cluster just to ask (serve's client would)
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        if client is not None:
            return str(client.http_config.host)
    from ray.serve.config import HTTPOptions

    return str(HTTPOptions().host)


def __getattr__(name: str) -> serve.Application:
    # `app` is built on first access, so importing this module never needs CE_RAY_MODEL.
    if name == "app":
        return app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- ce-ray serve --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="URI",
        help="checkpoint directory, models:/name/version, models:/name@alias, runs:/id/path, an exported file, "
        "or 'default' (the model ce-ray ships, used when no model is given); repeat for several models "
        "behind one endpoint (the first is the default)",
    )
    from ce_ray.infer.resolve import STORE_RULE

    parser.add_argument("--mlflow-tracking-uri", default=None, metavar="URI", help=STORE_RULE)
    parser.add_argument(
        "--models",
        default=None,
        metavar="NAME@ALIAS,...",
        help="registered models to serve too, comma-separated: name@alias or name/version",
    )
    parser.add_argument(
        "--max-models-per-replica",
        type=int,
        default=DEFAULT_MAX_MODELS_PER_REPLICA,
        help=f"models each replica keeps loaded (LRU; default {DEFAULT_MAX_MODELS_PER_REPLICA})",
    )
    parser.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least this many replicas")
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most this many replicas")
    parser.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=DEFAULT_TARGET_ONGOING_REQUESTS,
        help=f"autoscale: requests in flight per replica to aim for (default {DEFAULT_TARGET_ONGOING_REQUESTS:g})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help=f"file holding the API key clients must send as 'Authorization: Bearer <key>' (else ${API_KEY_ENV}); "
        "required when --host is not a loopback address",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve a non-loopback --host without an API key (only behind something that authenticates)",
    )
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument(
        "--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has a GPU, else 0"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per replica (0: Ray's default, = its CPUs)"
    )
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument(
        "--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else start a private local one)"
    )


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def run_from_args(args: argparse.Namespace) -> int:
    import ray

    from ce_ray import cluster

    connected_here = not ray.is_initialized()
    # --address, else RAY_ADDRESS, else a private local cluster (never another one on this machine
    # by accident). Serve needs no dashboard; its HTTP proxy binds --host (loopback by default).
    uris = parse_models(args.model, args.models)
    from ce_ray.infer.resolve import check_model

    for uri in uris:  # a missing or damaged checkpoint fails before Ray starts, not in a replica
        check_model(uri)
    # So does an exposed host without a key (never printed or logged: only its digest leaves here).
    api_key = resolve_api_key(args.host, args.api_key_file, os.environ.get(API_KEY_ENV), args.insecure_no_auth)
    own_cluster = cluster.connect_ray(args.address, dashboard=False)
    application = build_app(
        uris,
        replicas=args.replicas,
        max_models_per_replica=args.max_models_per_replica,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_upload_mb=args.max_upload_mb,
        max_pixels=args.max_pixels,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        device=args.device,
        threads=args.threads,
        tracking_uri=args.mlflow_tracking_uri,
        api_key=api_key,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # kill / systemd / docker stop clean up like Ctrl-C
    # Ctrl-C explicitly too: a process started from a background job (`cmd &` in a script, CI)
    # inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, _interrupt)
    try:
        quiet = {
            "enable_access_log": False,
            "log_level": "WARNING",
        }  # Serve's INFO lines would bury the one that matters
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        serve.run(application, name=APP_NAME, route_prefix="/", logging_config=quiet)
        auth = "API key required" if api_key else "no API key"
        print(f"serving {', '.join(uris)} at http://{args.host}:{args.port}/  ({auth}; Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        try:
            if own_cluster:
                # Our own cluster goes away: serve.shutdown() deletes the app too, and unlike
                # serve.delete (which waits without a limit for every replica to stop; seen to
                # hang past 3 min on a loaded machine) it gives the controller at most 30 s.
                serve.shutdown()  # type: ignore[no-untyped-call]  # ray: untyped
            else:
                serve.delete(APP_NAME)  # someone else's cluster: remove only what we deployed
        finally:
            if connected_here:
                ray.shutdown()
    return 0


if __name__ == "__main__":  # python -m ce_ray.infer.serve --model URI
    p = argparse.ArgumentParser(prog="ce_ray.infer.serve")
    add_arguments(p)
    raise SystemExit(run_from_args(p.parse_args()))
