"""serve.py over real HTTP on 127.0.0.1 (FastAPI's TestClient cannot host it: the deployment runs
only inside a Serve replica): the API round trip on a tiny trained checkpoint, every bad request
(4xx JSON, and the replica keeps serving), batching, the cluster/serve.yaml config with an
in-place reconfigure, and a model loaded from an MLflow registry URI."""

import io
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from ce_ray import config as C
from ce_ray.cluster import free_ports
from ce_ray.data.bundled import load_bundled
from ce_ray.infer import planner as I
from ce_ray.infer.resolve import load_generator

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # s per request: a 2-core machine shared with other test runs is slow, never a hang
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
UPLOAD_MB = 1.0  # small limits so the over-limit requests stay cheap
MAX_PIXELS = 1_000_000


def serve_base_url() -> str:
    """Start Serve on a free loopback port unless this session already did; its base URL."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_ports(1)[0]})
        client = _get_global_client()
    return f"http://127.0.0.1:{client.http_config.port}"


def wait_until(check, timeout: float = 180.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except requests.RequestException:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def photo():
    return dict(load_bundled())["skimage/chelsea"]  # 451x300


@pytest.fixture(scope="module")
def api(ray_session, tiny_checkpoint):
    """The app on the tiny checkpoint under /t-serve; deleted after this module."""
    from ray import serve

    from ce_ray.infer.serve import build_app

    base = serve_base_url()
    app = build_app(
        str(tiny_checkpoint),
        max_upload_mb=UPLOAD_MB,
        max_pixels=MAX_PIXELS,
        max_batch_size=8,
        batch_wait_ms=20,
        cpus_per_replica=0.5,
    )
    serve.run(app, name="test-serve", route_prefix="/t-serve", logging_config=LOGGING)
    try:
        yield base + "/t-serve"
    finally:
        serve.delete("test-serve")


def post(url: str, image: bytes | None = None, mask: bytes | None = None, **kw) -> requests.Response:
    files = {}
    if image is not None:
        files["image"] = ("photo.png", image, "application/octet-stream")
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return requests.post(url + "/v1/inpaint", files=files or None, timeout=TIMEOUT, **kw)


# --- Round trip ----------------------------------------------------------------------------------


def test_round_trip_with_a_mask(api, tiny_checkpoint, photo):
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[40:110, 60:200] = 255  # wider than one training-scale cell: a coarser window
    mask[250:270, 400:451] = 255  # at the right edge
    r = post(api, png(photo), png(mask))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and int(r.headers["X-Ce-Ray-Windows"]) >= 2
    out = decode(r.content)
    hole = mask > 127
    assert out.shape == photo.shape
    assert np.array_equal(out[~hole], photo[~hole]), "every pixel outside the mask is returned unchanged"
    # The same as inpainting locally with the same checkpoint (float summation order may differ by 1).
    local = I.inpaint_image(load_generator(str(tiny_checkpoint)), photo, hole)
    assert np.abs(out.astype(int) - local.astype(int)).max() <= 1


def test_round_trip_jpeg_with_the_default_centre_hole(api, loaded_geometry, photo):
    data = jpeg(photo)
    r = post(api, data)
    assert r.status_code == 200, r.text
    out, src = decode(r.content), decode(data)
    hole = I.default_hole(*src.shape[:2], loaded_geometry)
    assert np.array_equal(out[~hole], src[~hole])
    assert (out[hole] != src[hole]).any(-1).mean() > 0.5


@pytest.fixture(scope="module")
def loaded_geometry(tiny_checkpoint):
    return I.Geometry.of(load_generator(str(tiny_checkpoint)).config)


def test_healthz_and_model_info(api, tiny_checkpoint):
    h = requests.get(api + "/healthz", timeout=TIMEOUT)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = requests.get(api + "/v1/model", timeout=TIMEOUT).json()
    loaded = load_generator(str(tiny_checkpoint))
    assert m["name"] == tiny_checkpoint.name and m["version"] == str(loaded.step) and m["step"] == loaded.step
    assert m["config"] == C.to_dict(loaded.config)
    assert set(m["metrics"]) >= {"val_l1", "val_l2", "val_psnr"} and m["metrics"] == pytest.approx(loaded.metrics)
    assert m["limits"]["max_upload_bytes"] == int(UPLOAD_MB * 2**20) and m["limits"]["max_pixels"] == MAX_PIXELS
    assert m["batching"] == {"max_batch_size": 8, "batch_wait_ms": 20.0}


def test_the_page_is_self_contained(api):
    r = requests.get(api + "/", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for element in (
        'id="file"',
        'id="brush"',
        'id="undo"',
        'id="clear"',
        'id="inpaint"',
        'id="result"',
        'id="download"',
    ):
        assert element in page
    # Offline: nothing may come from another host (no CDN scripts, fonts or styles).
    assert "http://" not in page and "https://" not in page and 'src="//' not in page and "@import" not in page


# --- Bad requests --------------------------------------------------------------------------------


def _bad_cases(photo: np.ndarray) -> dict[str, tuple[dict, int, str]]:
    h, w = photo.shape[:2]
    good = png(photo)
    full = png(photo)
    black = np.zeros((h, w), np.uint8)
    white = np.full((h, w), 255, np.uint8)
    jpg = jpeg(photo)
    return {
        "missing image": ({"files": {"mask": ("m.png", png(black), "image/png")}}, 400, "missing_image"),
        "not multipart": (
            {"data": b"\x89PNG...", "headers": {"Content-Type": "image/png"}},
            415,
            "unsupported_media_type",
        ),
        "not an image": (
            {"files": {"image": ("a.txt", b"just some text, not a picture", "text/plain")}},
            415,
            "not_an_image",
        ),
        "truncated png": ({"files": {"image": ("a.png", full[: len(full) // 2], "image/png")}}, 400, "truncated_image"),
        "truncated jpeg": ({"files": {"image": ("a.jpg", jpg[: len(jpg) // 2], "image/jpeg")}}, 400, "truncated_image"),
        "mask of another size": (
            {"files": {"image": ("a.png", good, "image/png"), "mask": ("m.png", png(black[:100, :100]), "image/png")}},
            400,
            "mask_size_mismatch",
        ),
        "empty mask": (
            {"files": {"image": ("a.png", good, "image/png"), "mask": ("m.png", png(black), "image/png")}},
            400,
            "empty_mask",
        ),
        "all-white mask": (
            {"files": {"image": ("a.png", good, "image/png"), "mask": ("m.png", png(white), "image/png")}},
            400,
            "all_white_mask",
        ),
        "mask not an image": (
            {"files": {"image": ("a.png", good, "image/png"), "mask": ("m.png", b"nope", "image/png")}},
            415,
            "not_an_image",
        ),
        "too many pixels": (
            {"files": {"image": ("big.png", png(np.zeros((1000, 1200, 3), np.uint8)), "image/png")}},
            413,
            "too_many_pixels",
        ),
        "payload over the limit": (
            {"files": {"image": ("big.png", os.urandom(int(1.5 * 2**20)), "image/png")}},
            413,
            "payload_too_large",
        ),
    }


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(api, photo):
    for name, (kwargs, status, code) in _bad_cases(photo).items():
        r = requests.post(api + "/v1/inpaint", timeout=TIMEOUT, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert body["error"] == code and body["detail"], (name, body)
        assert requests.get(api + "/healthz", timeout=TIMEOUT).json()["status"] == "ok", name
    r = post(api, png(photo))  # and real work still goes through
    assert r.status_code == 200 and decode(r.content).shape == photo.shape


def test_oversized_upload_is_refused_before_its_body_is_read(api):
    """Headers announce 1 GB and no body byte is ever sent: the 413 can only come from the
    Content-Length check (a server reading the body first would wait for it until the timeout)."""
    port = int(api.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(
            b"POST /t-serve/v1/inpaint HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1073741824\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or b"payload_too_large" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"payload_too_large" in reply and b"1073741824" in reply


def test_chunked_upload_without_length_is_counted(api):
    def body():
        for _ in range(32):  # 2 MB in 64 KB chunks, no Content-Length (chunked transfer)
            yield b"\0" * 65536

    r = requests.post(
        api + "/v1/inpaint", data=body(), headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=TIMEOUT
    )
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


# --- Batching ------------------------------------------------------------------------------------


def test_concurrent_requests_share_batches(api, photo):
    data = png(photo)
    expect = decode(post(api, data).content)

    def one(_):
        r = post(api, data)
        return (
            r.status_code,
            int(r.headers.get("X-Ce-Ray-Batch", 0)),
            decode(r.content) if r.status_code == 200 else None,
        )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert all(status == 200 for status, _, _ in results)
    for _, _, out in results:  # batching never changes an answer beyond float summation order
        assert np.abs(out.astype(int) - expect.astype(int)).max() <= 1
    # 16 clients against one replica whose forward takes milliseconds: requests queue while a batch
    # runs, so later batches hold several of them (with max_batch_size 8 and a 20 ms wait).
    assert max(b for _, b, _ in results) > 1
    assert all(1 <= b <= 8 for _, b, _ in results)


# --- cluster/serve.yaml: deploy, then reconfigure in place ---------------------------------------


def test_serve_yaml_deploys_and_reconfigure_needs_no_restart(ray_session, tiny_checkpoint, photo):
    """cluster/serve.yaml as `serve deploy` applies it (ce_ray.infer.serve:app from env vars), with only
    the model, name, route and CPU changed for the test. A new user_config reaches the running
    replica through `reconfigure`: same replica before and after."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    base = serve_base_url()
    cfg = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    assert cfg["proxy_location"] == "HeadOnly" and cfg["http_options"]["host"] == "127.0.0.1"
    for key in ("proxy_location", "http_options"):  # the session's Serve is already running
        cfg.pop(key)
    app = cfg["applications"][0]
    app.update(name="test-yaml", route_prefix="/t-yaml")
    app["runtime_env"]["env_vars"] = {**app["runtime_env"]["env_vars"], "CE_RAY_MODEL": str(tiny_checkpoint)}
    app["runtime_env"]["env_vars"].pop("MLFLOW_TRACKING_URI")
    dep = app["deployments"][0]
    dep["ray_actor_options"]["num_cpus"] = 0.5
    client = _get_global_client()
    url = base + "/t-yaml"
    try:
        client.deploy_apps(ServeDeploySchema(**cfg))
        first = wait_until(lambda: requests.get(url + "/healthz", timeout=TIMEOUT).json(), what="the YAML app")
        assert requests.get(url + "/v1/model", timeout=TIMEOUT).json()["batching"] == {
            "max_batch_size": dep["user_config"]["max_batch_size"],
            "batch_wait_ms": float(dep["user_config"]["batch_wait_ms"]),
        }
        dep["user_config"] = {"max_batch_size": 3, "batch_wait_ms": 1}
        client.deploy_apps(ServeDeploySchema(**cfg))
        wait_until(
            lambda: requests.get(url + "/v1/model", timeout=TIMEOUT).json()["batching"]["max_batch_size"] == 3,
            what="the new user_config",
        )
        assert requests.get(url + "/healthz", timeout=TIMEOUT).json()["replica"] == first["replica"], (
            "reconfigured in place"
        )
        assert post(url, png(photo)).status_code == 200
    finally:
        from ray import serve

        serve.delete("test-yaml")


def test_rayservice_manifest_carries_a_valid_serve_config():
    """cluster/rayservice.yaml's serveConfigV2 is what KubeRay hands to Serve: it must parse as a
    Serve config and deploy the same app and deployment as cluster/serve.yaml."""
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    import ray

    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    k8s = ServeDeploySchema(**yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    local = ServeDeploySchema(**yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text()))
    assert k8s.applications[0].import_path == local.applications[0].import_path == "ce_ray.infer.serve:app"
    assert k8s.applications[0].deployments[0].name == local.applications[0].deployments[0].name == "Inpainter"
    assert set(k8s.applications[0].deployments[0].user_config) == {"max_batch_size", "batch_wait_ms"}
    for schema in (k8s, local):  # both autoscale, between the same bounds ce-ray serve's flags set
        auto = schema.applications[0].deployments[0].autoscaling_config
        auto = auto if isinstance(auto, dict) else auto.dict()
        assert auto["min_replicas"] == 1 and auto["max_replicas"] == 4 and auto["target_ongoing_requests"] == 4


# --- A model from the MLflow registry ------------------------------------------------------------


def test_serves_a_registered_model(ray_session, tiny_checkpoint, tmp_path, photo):
    """Register the tiny checkpoint the way training does (mlflow_run.register_generator: pyfunc from
    code, no pickle) in a SQLite store, then serve models:/name/1 from it."""
    from ray import serve

    from ce_ray import tracking
    from ce_ray.infer.serve import build_app, describe_model
    from ce_ray.train import mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loaded = load_generator(str(tiny_checkpoint))
    cfg = C.replace(
        loaded.config,
        mlflow={"tracking_uri": uri, "registered_model": "ce-serve-test"},
        train={"output_dir": str(tmp_path)},
    )
    handle = tracking.start_run(cfg, run_name="serve-test", run_path=str(tmp_path / "run"), resume=False)
    model_uri = mlflow_run.register_generator(handle, tiny_checkpoint, cfg)
    tracking.end_run(handle)
    assert model_uri == "models:/ce-serve-test/1"

    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).set_registered_model_alias("ce-serve-test", "best", "1")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:  # an alias resolves to its version number
        by_alias = load_generator("models:/ce-serve-test@best")
        assert describe_model("models:/ce-serve-test@best", by_alias)["version"] == "1"
        assert describe_model("models:/ce-serve-test/latest", by_alias)["version"] == "1"
    finally:
        if old is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old

    base = serve_base_url()
    serve.run(
        build_app(model_uri, tracking_uri=uri, cpus_per_replica=0.5),
        name="test-registry",
        route_prefix="/t-registry",
        logging_config=LOGGING,
    )
    try:
        url = base + "/t-registry"
        m = requests.get(url + "/v1/model", timeout=TIMEOUT).json()
        assert (m["name"], m["version"], m["source"]) == ("ce-serve-test", "1", model_uri)
        assert m["config"] == C.to_dict(loaded.config) and m["metrics"] == pytest.approx(loaded.metrics)
        r = post(url, png(photo))
        assert r.status_code == 200
        hole = I.default_hole(*photo.shape[:2], I.Geometry.of(loaded.config))
        out = decode(r.content)
        assert np.array_equal(out[~hole], photo[~hole])
        local = I.inpaint_image(loaded, photo)  # the same weights as the checkpoint directory
        assert np.abs(out.astype(int) - local.astype(int)).max() <= 1
    finally:
        serve.delete("test-registry")


# --- ce-ray serve --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_serve_command_serves_until_interrupted(tiny_checkpoint, tmp_path):
    """`ce-ray serve` in a subprocess (its own private Ray, as a user runs it): it answers on the
    loopback port it was given, and Ctrl-C (SIGINT) shuts down what it started and exits 0."""
    import signal
    import subprocess
    import sys

    port = free_ports(1)[0]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ce_ray.cli",
            "serve",
            "--model",
            str(tiny_checkpoint),
            "--port",
            str(port),
            "--cpus-per-replica",
            "0.5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready = it printed the URL (serve.run returned), not merely the proxy answering.
        wait_until(
            lambda: proc.poll() is not None or "serving" in (tmp_path / "serve.log").read_text(),
            timeout=300,
            what="ce-ray serve",
        )
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert requests.get(url + "/healthz", timeout=TIMEOUT).json()["status"] == "ok"
        assert requests.get(url + "/v1/model", timeout=TIMEOUT).json()["name"] == tiny_checkpoint.name
        with socket.socket() as s:  # bound to loopback only: another local address is refused
            addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
            if addrs:
                s.settimeout(5)
                assert s.connect_ex((sorted(addrs)[0], port)) != 0
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "ce-ray serve did not exit within 180 s of Ctrl-C:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            )
        assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
        with pytest.raises(requests.ConnectionError):
            requests.get(url + "/healthz", timeout=10)
        assert f"serving {tiny_checkpoint} at {url}/" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()
