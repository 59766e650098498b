"""Several models behind one endpoint, the classical comparison, and autoscaling, over real HTTP on
127.0.0.1: per-request model choice (form field or Serve's multiplexed-model header), /v1/models,
404 for an unknown model, LRU eviction per replica, batches that never mix models, the
`method=telea|...` comparison, and a burst that scales a local app from 1 to 2 replicas and back."""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from helpers import load_models
from test_serve import LOGGING, TIMEOUT, decode, photo, png, post, serve_base_url, wait_until  # noqa: F401  (photo: a fixture)

from ce_ray.core.baselines import inpaint_image
from ce_ray.infer import resolve
from ce_ray.train import checkpoint as ck

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def three_models(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint and two copies whose generators differ (their outputs differ)."""
    root = tmp_path_factory.mktemp("models")
    src = ck.load(tiny_checkpoint)
    out = [str(tiny_checkpoint)]
    G, D = load_models(src)
    for i, scale in enumerate((0.5, 1.5), start=2):
        with torch.no_grad():
            last = [m for m in G.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
            last.weight.mul_(scale)
        out.append(str(ck.save(root / f"m{i}", G=G, D=D, step=src.step, config=src.config, metrics=src.metrics)))
    return out


@pytest.fixture(scope="module")
def multi(ray_session, three_models):
    from ray import serve

    from ce_ray.infer.serve import build_app

    base = serve_base_url()
    app = build_app(three_models, max_models_per_replica=2, cpus_per_replica=0.5, batch_wait_ms=50)
    serve.run(app, name="test-models", route_prefix="/t-models", logging_config=LOGGING)
    try:
        yield base + "/t-models"
    finally:
        serve.delete("test-models")


def test_models_are_listed_chosen_per_request_and_unknown_is_404(multi, three_models, photo):  # noqa: F811  (photo: the fixture imported from test_serve)
    listing = requests.get(multi + "/v1/models", timeout=TIMEOUT).json()
    ids = [m["id"] for m in listing["models"]]
    assert ids == ["tiny-ce", "m2", "m3"] and listing["default"] == "tiny-ce" and listing["max_models_per_replica"] == 2
    outs = {}
    for mid in ids:
        r = post(multi, png(photo), data={"model": mid})
        assert r.status_code == 200, r.text
        assert r.headers["X-Ce-Ray-Model"] == mid
        outs[mid] = decode(r.content)
    # The header route (Serve's multiplexed model id) reaches the same model as the form field.
    r = post(multi, png(photo), headers={"serve_multiplexed_model_id": "m2"})
    assert r.status_code == 200 and r.headers["X-Ce-Ray-Model"] == "m2"
    assert np.array_equal(decode(r.content), outs["m2"])
    assert not np.array_equal(outs["tiny-ce"], outs["m2"]) and not np.array_equal(outs["m2"], outs["m3"])
    # Each equals that checkpoint inpainted locally.
    for mid, uri in zip(ids, three_models):
        local = resolve.load_generator(uri)
        from ce_ray.infer import planner as I

        assert np.abs(outs[mid].astype(int) - I.inpaint_image(local, photo).astype(int)).max() <= 1
    r = post(multi, png(photo), data={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_model" and r.json()["models"] == ids
    assert requests.get(multi + "/v1/model", params={"model": "m3"}, timeout=TIMEOUT).json()["id"] == "m3"
    assert requests.get(multi + "/v1/model", params={"model": "nope"}, timeout=TIMEOUT).status_code == 404


def test_lru_keeps_at_most_two_models_per_replica(multi, photo):  # noqa: F811  (photo: the fixture imported from test_serve)
    for mid in ("tiny-ce", "m2", "m3"):
        assert post(multi, png(photo), data={"model": mid}).status_code == 200
    loaded = {m["id"] for m in requests.get(multi + "/v1/models", timeout=TIMEOUT).json()["models"] if m["loaded_here"]}
    assert loaded == {"m2", "m3"}, "the least recently used model (tiny-ce) was evicted"
    assert post(multi, png(photo), data={"model": "tiny-ce"}).status_code == 200  # loads again on demand
    loaded = {m["id"] for m in requests.get(multi + "/v1/models", timeout=TIMEOUT).json()["models"] if m["loaded_here"]}
    assert loaded == {"m3", "tiny-ce"}


def test_a_batch_never_mixes_models(multi, photo):  # noqa: F811  (photo: the fixture imported from test_serve)
    jobs = [("tiny-ce" if i % 2 else "m2") for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda mid: (mid, post(multi, png(photo), data={"model": mid})), jobs))
    outs = {}
    for mid, r in replies:
        assert r.status_code == 200 and r.headers["X-Ce-Ray-Model"] == mid
        outs.setdefault(mid, []).append(decode(r.content))
    for mid, images in outs.items():  # a request batched with the other model's would come back different
        assert all(np.array_equal(images[0], im) for im in images), mid
    batches = [int(r.headers["X-Ce-Ray-Batch"]) for _, r in replies]
    assert max(batches) <= 6, batches  # never more than one model's share of the 12


@pytest.mark.parametrize("method", ["telea", "navier_stokes", "biharmonic", "harmonic"])
def test_method_compares_with_a_classical_fill_of_the_same_hole(multi, photo, method):  # noqa: F811  (photo: the fixture imported from test_serve)
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[100:160, 150:230] = 255
    r = post(multi, png(photo), png(mask), data={"method": method})
    assert r.status_code == 200, r.text
    assert r.headers["X-Ce-Ray-Model"] == method and r.headers["X-Ce-Ray-Windows"] == "0"
    out = decode(r.content)
    assert np.array_equal(out, inpaint_image(method, photo, mask > 127))
    r = post(multi, png(photo), png(mask), data={"method": "magic"})
    assert r.status_code == 400 and r.json()["error"] == "bad_method"


def _running(app: str) -> int:
    from ray import serve

    dep = serve.status().applications[app].deployments["Inpainter"]
    return dep.replica_states.get("RUNNING", 0)


def test_a_burst_scales_from_one_replica_to_two_and_back(ray_session, tiny_checkpoint, photo):  # noqa: F811  (photo: the fixture imported from test_serve)
    from ray import serve

    from ce_ray.infer.serve import build_app

    base = serve_base_url()
    app = build_app(
        str(tiny_checkpoint),
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        cpus_per_replica=0.5,
        upscale_delay_s=0.0,
        downscale_delay_s=3.0,
        look_back_period_s=2.0,
        max_batch_size=1,
        batch_wait_ms=0,
    )
    serve.run(app, name="test-autoscale", route_prefix="/t-autoscale", logging_config=LOGGING)
    url = base + "/t-autoscale"
    try:
        assert _running("test-autoscale") == 1
        body = png(photo)
        stop = time.monotonic() + 150
        with ThreadPoolExecutor(8) as pool:

            def burst():
                while time.monotonic() < stop and _running("test-autoscale") < 2:
                    post(url, body)

            futures = [pool.submit(burst) for _ in range(8)]
            wait_until(lambda: _running("test-autoscale") == 2, timeout=150, what="a second replica under the burst")
            stop = 0
            for f in futures:
                f.result()
        wait_until(lambda: _running("test-autoscale") == 1, timeout=150, what="scaling back to one replica when idle")
        assert post(url, body).status_code == 200
    finally:
        serve.delete("test-autoscale")
