"""The registered model for generic MLflow tools: `mlflow.pyfunc.load_model(...).predict` on real
photos of any size (one, a list, with a mask, a DataFrame of encoded bytes) and on the old tensor
input, and a real `mlflow models serve` process answering /invocations on 127.0.0.1. No Ray."""

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from ce_ray import config as C
from ce_ray import tracking
from ce_ray.cluster import free_ports
from ce_ray.data.bundled import load_bundled
from ce_ray.infer import planner as I
from ce_ray.infer.resolve import load_generator
from ce_ray.train import mlflow_run


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registered(tiny_checkpoint, tmp_path_factory):
    """The tiny trained checkpoint registered as models:/pyfunc-test/1 in a fresh SQLite store."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = C.load(
        None,
        [
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=pyfunc-test",
            "mlflow.registered_model=pyfunc-test",
            f"train.output_dir={root}",
            "model.bottleneck=64",
            "model.ngf=8",
            "model.ndf=8",
        ],
    )
    h = tracking.start_run(cfg, run_name="pyfunc", run_path=str(root / "run"), resume=False)
    model_uri = mlflow_run.register_generator(h, tiny_checkpoint, cfg)
    tracking.end_run(h)
    return uri, model_uri


@pytest.fixture(scope="module")
def pyfunc(registered):
    import mlflow

    uri, model_uri = registered
    with tracking.using(uri):
        return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="module")
def photos():
    b = dict(load_bundled())
    return b["skimage/chelsea"], b["skimage/coffee"][:200, :260]


def test_pyfunc_takes_photos_of_any_size_and_returns_uint8_images(pyfunc, tiny_checkpoint, photos):
    cat, cup = photos
    loaded = load_generator(str(tiny_checkpoint))
    out = pyfunc.predict(cat)
    assert out.dtype == np.uint8 and out.shape == cat.shape
    assert np.abs(out.astype(int) - I.inpaint_image(loaded, cat).astype(int)).max() <= 1
    hole = I.default_hole(*cat.shape[:2], I.Geometry.of(loaded.config))
    assert np.array_equal(out[~hole], cat[~hole]) and not np.array_equal(out[hole], cat[hole])
    # A list of photos of different sizes.
    many = pyfunc.predict([cat, cup])
    assert [m.shape for m in many] == [cat.shape, cup.shape] and np.array_equal(many[0], out)
    # A photo and its mask.
    mask = np.zeros(cup.shape[:2], np.uint8)
    mask[20:60, 30:120] = 255
    masked = pyfunc.predict({"image": cup, "mask": mask})
    changed = (masked != cup).any(-1)
    assert changed[20:60, 30:120].any() and not changed[mask == 0].any()
    # A DataFrame of encoded bytes (what batch scoring and /invocations carry), mask optional.
    df = pyfunc.predict(pd.DataFrame({"image": [png(cat), png(cup)], "mask": [None, png(mask)]}))
    assert list(df.columns) == ["image"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(df["image"][0]))), out)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(df["image"][1]))), masked)


def test_pyfunc_still_takes_the_tensor_crops(pyfunc):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    out = pyfunc.predict(x)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.array_equal(out[:, :, :32], x[:, :, :32])  # context outside the centre is untouched
    assert not np.array_equal(out[:, :, 40:88, 40:88], x[:, :, 40:88, 40:88])


def test_the_logged_model_describes_its_inputs(pyfunc):
    meta = pyfunc.metadata
    assert meta.get_input_schema() is None  # several input forms: none is enforced
    assert meta.get_output_schema().inputs[0].shape == (-1, -1, 3)
    assert set(meta.metadata["inputs"]) == set(mlflow_run.PYFUNC_INPUTS)


def test_mlflow_models_serve_answers_invocations_with_images(registered, tiny_checkpoint, photos, tmp_path):
    uri, model_uri = registered
    cat, cup = photos
    port = free_ports(1)[0]
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin folder goes on PATH.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = open(tmp_path / "serve.log", "w")
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [
            mlflow_cli,
            "models",
            "serve",
            "-m",
            model_uri,
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(base + "/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (
                "mlflow models serve did not come up:\n" + (tmp_path / "serve.log").read_text()
            )
            time.sleep(1)
        loaded = load_generator(str(tiny_checkpoint))
        # A DataFrame of base64 PNGs in, base64 PNGs out.
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png(cat)).decode()]]}}
        r = requests.post(base + "/invocations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["predictions"][0]["image"]))))
        assert np.abs(got.astype(int) - I.inpaint_image(loaded, cat).astype(int)).max() <= 1
        # A photo as a nested list of 0..255 integers ("inputs"), an image back.
        small = cup[:96, :128]
        r = requests.post(base + "/invocations", json={"inputs": small.tolist()}, timeout=120)
        assert r.status_code == 200, r.text
        arr = np.asarray(r.json()["predictions"], dtype=np.uint8)
        assert arr.shape == small.shape
        assert np.abs(arr.astype(int) - I.inpaint_image(loaded, small).astype(int)).max() <= 1
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
