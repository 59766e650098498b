"""The API key: `ce-ray serve` refuses a non-loopback host without one (before any Ray starts), key
files that cannot be used are clear errors, and a served app with a key answers 401 JSON on every
route but /healthz and the page without the right `Authorization: Bearer` header, over real HTTP
on 127.0.0.1. A loopback app without a key stays open: every other test in test_serve.py, and
test_the_serve_command_serves_until_interrupted for the CLI itself."""

import pytest
import requests
from test_serve import LOGGING, TIMEOUT, decode, photo, png, post, serve_base_url  # noqa: F401  (photo: a fixture)

from ce_ray import cli, cluster
from ce_ray.errors import UserError
from ce_ray.infer import serve as S

KEY = "s3cret-test-key-0123456789"


@pytest.fixture
def no_key_env(monkeypatch):
    for name in (S.API_KEY_ENV, S.API_KEY_FILE_ENV, S.INSECURE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """The CLI stops at this point instead of connecting to Ray: reaching it means the key checks passed."""

    def stop(*args, **kwargs):
        raise UserError("connect_ray reached")

    monkeypatch.setattr(cluster, "connect_ray", stop)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["serve", "--model", "default", "--port", "8999", *argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


# --- The refusal (no cluster) --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "inpaint.example.org"])
def test_an_exposed_host_without_a_key_is_refused_before_ray_starts(host, capsys, no_key_env, ray_must_not_start):
    rc, out = run_cli(capsys, "--host", host)
    assert rc == 2
    assert f"refusing to serve on {host}" in out and "not a loopback address" in out
    for way_out in ("--api-key-file PATH", S.API_KEY_ENV, "127.0.0.1", "--insecure-no-auth"):
        assert way_out in out, way_out
    assert "connect_ray reached" not in out and "Traceback" not in out


def test_each_way_out_of_the_refusal_gets_past_it(tmp_path, capsys, monkeypatch, no_key_env, ray_must_not_start):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    for argv in (
        ["--host", "0.0.0.0", "--api-key-file", str(key_file)],
        ["--host", "0.0.0.0", "--insecure-no-auth"],
        ["--host", "127.0.0.1"],
        ["--host", "localhost"],
        ["--host", "::1"],
    ):
        rc, out = run_cli(capsys, *argv)
        assert rc == 2 and "connect_ray reached" in out, (argv, out)
        assert KEY not in out, "the key is never printed"
    monkeypatch.setenv(S.API_KEY_ENV, KEY)
    rc, out = run_cli(capsys, "--host", "0.0.0.0")
    assert "connect_ray reached" in out and KEY not in out


def test_key_files_that_cannot_be_used_are_clear_errors(tmp_path, capsys, no_key_env, ray_must_not_start):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    rc, out = run_cli(capsys, "--host", "0.0.0.0", "--api-key-file", str(empty))
    assert rc == 2 and f"the API key file {empty} is empty" in out and "connect_ray reached" not in out
    missing = tmp_path / "missing"
    rc, out = run_cli(capsys, "--host", "127.0.0.1", "--api-key-file", str(missing))  # on loopback too
    assert rc == 2 and f"cannot read the API key file {missing}" in out and "No such file" in out
    rc, out = run_cli(capsys, "--host", "0.0.0.0", "--api-key-file", str(tmp_path))  # a folder
    assert rc == 2 and f"cannot read the API key file {tmp_path}" in out and "Traceback" not in out


def test_which_key_wins_and_loopback_needs_none(tmp_path, no_key_env):
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    assert S.resolve_api_key("0.0.0.0", str(key_file), "other", False) == KEY, "the file, stripped, over the env"
    assert S.resolve_api_key("0.0.0.0", None, f" {KEY} ", False) == KEY
    assert S.resolve_api_key("127.0.0.1", None, KEY, False) == KEY, "a key given on loopback is enforced"
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert S.resolve_api_key(host, None, None, False) is None, host
    assert S.resolve_api_key("0.0.0.0", None, "", True) is None


def test_the_serve_config_app_refuses_an_exposed_proxy_without_a_key(monkeypatch, tmp_path, no_key_env):
    """ce_ray.infer.serve:app (cluster/serve.yaml, rayservice.yaml) reads the same three ways out
    from env vars, and checks the host Serve's proxies bind."""
    monkeypatch.setattr(S, "_serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(UserError) as e:
        S.app_from_env()
    for way_out in (f"{S.API_KEY_FILE_ENV}=PATH", S.API_KEY_ENV, f"{S.INSECURE_ENV}=1", "0.0.0.0"):
        assert way_out in str(e.value), way_out
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    monkeypatch.setenv(S.API_KEY_FILE_ENV, str(key_file))
    app = S.app_from_env()
    kwargs = app._bound_deployment.init_kwargs  # what the replicas get: the digest, never the key
    assert kwargs["api_key_sha256"] == S.key_digest(KEY) and KEY not in repr(kwargs)


# --- A served app with a key ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(ray_session, tiny_checkpoint):
    """The app on the tiny checkpoint with an API key, under /t-auth (on loopback: a key given there
    is enforced too)."""
    from ray import serve

    base = serve_base_url()
    app = S.build_app(str(tiny_checkpoint), cpus_per_replica=0.5, api_key=KEY)
    serve.run(app, name="test-auth", route_prefix="/t-auth", logging_config=LOGGING)
    try:
        yield base + "/t-auth"
    finally:
        serve.delete("test-auth")


def _assert_401(r: requests.Response, code: str) -> None:
    assert r.status_code == 401, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json" and r.headers.get("www-authenticate") == "Bearer"
    body = r.json()
    assert body["error"] == code and body["detail"], body
    assert KEY not in r.text


def test_without_the_right_key_every_route_but_healthz_and_the_page_is_401(keyed, photo):  # noqa: F811  (photo: the fixture imported from test_serve)
    image = png(photo)
    for headers, code in (
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEY}x"}, "invalid_api_key"),
        ({"Authorization": f"Basic {KEY}"}, "missing_api_key"),  # another scheme is no bearer key
        ({"Authorization": KEY}, "missing_api_key"),
    ):
        _assert_401(post(keyed, image, headers=headers), code)
        _assert_401(post(keyed, image, data={"method": "telea"}, headers=headers), code)
        for route in ("/v1/models", "/v1/model", "/v1/model?model=tiny-ce", "/no-such-route"):
            _assert_401(requests.get(keyed + route, headers=headers, timeout=TIMEOUT), code)
    # Probes and the page (static: it asks the user for the key) need none.
    h = requests.get(keyed + "/healthz", timeout=TIMEOUT)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    page = requests.get(keyed + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and 'id="inpaint"' in page.text and "sessionStorage" in page.text


def test_with_the_right_key_everything_answers(keyed, photo):  # noqa: F811  (photo: the fixture imported from test_serve)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = post(keyed, png(photo), headers=auth)
    assert r.status_code == 200, r.text[:300]
    assert decode(r.content).shape == photo.shape
    assert requests.get(keyed + "/v1/models", headers=auth, timeout=TIMEOUT).json()["default"] == "tiny-ce"
    assert requests.get(keyed + "/v1/model", headers=auth, timeout=TIMEOUT).json()["step"] > 0
    # "bearer" is case-insensitive (RFC 6750), surrounding blanks are not part of the key
    r = requests.get(keyed + "/v1/models", headers={"Authorization": f"bearer  {KEY} "}, timeout=TIMEOUT)
    assert r.status_code == 200


# --- The manifests -------------------------------------------------------------------------------


def test_manifests_take_the_key_from_a_secret_never_a_literal():
    """cluster/serve.yaml stays on loopback (no key needed); cluster/rayservice.yaml binds 0.0.0.0,
    so its app gets the key from a file that every pod mounts from a Kubernetes secret."""
    import yaml
    from test_serve import ROOT

    local = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    assert S.is_loopback(local["http_options"]["host"])
    assert S.API_KEY_ENV not in local["applications"][0]["runtime_env"]["env_vars"]

    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert not S.is_loopback(serve_cfg["http_options"]["host"])
    env = serve_cfg["applications"][0]["runtime_env"]["env_vars"]
    assert S.API_KEY_ENV not in env and S.INSECURE_ENV not in env
    key_path = env[S.API_KEY_FILE_ENV]
    cluster_cfg = manifest["spec"]["rayClusterConfig"]
    pods = [cluster_cfg["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_cfg["workerGroupSpecs"]]
    for pod in pods:  # the app is built on whichever node Serve picks
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in secrets]
        assert any(key_path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), pod["containers"][0]["name"]
        for c in pod["containers"]:  # no key written into a container's environment either
            for e in c.get("env", []):
                assert e["name"] != S.API_KEY_ENV or "valueFrom" in e
