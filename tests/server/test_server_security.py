"""Security: credentials on every route (walked from the app's route table, so a new route cannot slip past),
compared in constant time; no route touches a path taken from a request; CORS closed unless asked for;
pickles dropped into the served folders refused and never run.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
import threading

import pytest
from starlette.routing import Mount

from srv import FAST
from t2i.server import create_app

A = "/sdapi/v1"
CREDS = [("ann", "s3cret"), ("bob", "pw"), ("cy", "another one")]


def flat_routes(routes, prefix: str = ""):
    """(prefix, route) for every route, looking into included routers (FastAPI may keep them as one entry)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from flat_routes(inner.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
        else:
            assert hasattr(route, "path"), f"a kind of route this walk does not know: {route!r}"
            yield prefix, route


def every_request(app) -> list[tuple[str, str]]:
    """(method, path) for every route and method in the app's table, path parameters filled in, and for each
    mounted folder a file that is in it and one that is not."""
    out = []
    for prefix, route in flat_routes(app.routes):
        if isinstance(route, Mount):
            folder = getattr(route.app, "directory", None)
            files = sorted(p.name for p in __import__("pathlib").Path(folder).iterdir() if p.is_file())[:3]
            out += [("GET", f"{prefix}{route.path}/{name}") for name in files + ["no-such-file"]]
            continue
        path = re.sub(r"{[^}]+}", "x", prefix + route.path)
        out += [(method, path) for method in sorted(getattr(route, "methods", None) or {"GET"})]
    return out


def test_every_route_of_the_table_needs_the_credentials(make_client):
    c = make_client(api_auth=CREDS)
    app = c.app
    requests = every_request(app)
    paths = {p for _, p in requests}
    # the table has what the issue names; a route added later is in it too, and so in this walk
    assert {"/", "/docs", "/openapi.json", f"{A}/txt2img", "/t2i/v1/jobs/x/events"} <= paths
    assert any(p.startswith("/static/") for p in paths) and any(p.startswith("/docs/files/") for p in paths)
    assert len(requests) >= len(app.openapi()["paths"]) + 6  # the API's routes, the page, /docs, the mounts
    for method, path in requests:
        for auth in (None, ("ann", "wrong"), ("nobody", "s3cret"), ("ann", "pw")):
            r = c.request(method, path, auth=auth, json={} if method in ("POST", "PUT", "PATCH") else None)
            assert r.status_code == 401, (method, path, auth, r.status_code)
            assert r.headers["www-authenticate"] == 'Basic realm="t2i"'
            assert r.content == (b"" if method == "HEAD" else
                                 b'{"detail": "authentication required (HTTP Basic, see --api-auth)"}')
    for header in ("Basic", "Basic !!!", "Bearer s3cret", "basic " + base64.b64encode(b"ann").decode(),
                   "Basic " + base64.b64encode(b"ann:s3cret:x").decode(), "Basic " + base64.b64encode(b":").decode()):
        assert c.get("/", headers={"Authorization": header}).status_code == 401
    for user, password in CREDS:  # and with them, every GET route answers something other than 401
        for method, path in requests:
            if method == "GET" and not path.endswith("/events"):
                assert c.get(path, auth=(user, password)).status_code != 401, path
    print(f"auth: {len(requests)} route/method pairs x 4 wrong credentials refused")


def test_credentials_are_compared_in_constant_time(monkeypatch):
    """Every configured pair is compared, user and password, with secrets.compare_digest, whether the first,
    the last or none matches: the time taken does not tell which part was right."""
    from t2i.server import auth

    calls = []
    real = auth.secrets.compare_digest
    monkeypatch.setattr(auth.secrets, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    check = auth.BasicAuth(None, CREDS)
    counts = {}
    for user, password in [("ann", "s3cret"), ("cy", "another one"), ("ann", "wrong"), ("x", "y"), ("", "")]:
        calls.clear()
        header = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
        allowed = check.allowed(header)
        counts[(user, password)] = len(calls)
        assert allowed == ((user, password) in CREDS)
    assert set(counts.values()) == {2 * len(CREDS)}
    source = open(auth.__file__).read()
    assert "password ==" not in source and "== password" not in source and "== p" not in source


class FileWatch:
    """An audit hook (once per process) that records every file-system event whose path holds `needle`."""

    events: list = []
    needle: str | None = None
    installed = False
    KINDS = {"open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.link", "os.symlink",
             "os.chmod", "os.truncate", "shutil.rmtree", "shutil.copyfile", "os.rmdir", "os.utime"}

    @classmethod
    def watch(cls, needle: str) -> None:
        cls.needle, cls.events = needle, []
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True

    @classmethod
    def _hook(cls, event, args):
        if cls.needle and event in cls.KINDS and args and cls.needle in str(args[0]):
            cls.events.append((event, str(args[0]), threading.current_thread().name))


def string_fields(spec: dict, op: dict) -> set[str]:
    """The top-level properties of an operation's body schema that may be strings."""
    content = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    schemas = content.get("schema", {})
    refs = [s.get("$ref") for s in schemas.get("anyOf", [schemas])]
    fields = set()
    for ref in refs:
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schemas
        for name, prop in schema.get("properties", {}).items():
            if "string" in json.dumps(prop) or not prop:
                fields.add(name)
    return fields


def test_no_route_touches_a_path_taken_from_a_request(make_client, tmp_path, tiny_sd, lora_file):
    """A folder holds everything a request might try to reach by path (a model, a LoRA, an image, a file to
    overwrite); every string field of every route, every query and path parameter, and the <lora:...> tag
    are set to paths into it (absolute, relative, file: URLs, traversals). No file-system event (open,
    listdir, remove, ...) on any thread ever names that folder."""
    probe = tmp_path / "probe-7f3a"
    shutil.copytree(tiny_sd, probe / "model")
    shutil.copy(lora_file, probe / "ink.safetensors")
    (probe / "image.png").write_bytes(base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGP4DwABAQEAG7buVgAAAABJRU5ErkJggg=="))
    (probe / "victim.txt").write_text("keep me")
    values = [str(probe / "model"), str(probe / "ink.safetensors"), f"file://{probe}/image.png",
              f"../../../../..{probe}/victim.txt", f"{probe}/model [abc]"]
    c = make_client(out=tmp_path / "out") if (tmp_path / "out").mkdir() is None else None
    spec = c.app.openapi()
    FileWatch.watch("probe-7f3a")
    sent = 0
    try:
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                fields = string_fields(spec, op)
                params = [p["name"] for p in op.get("parameters", [])]
                for value in values:
                    url = re.sub(r"{[^}]+}", value.replace("/", "%2F"), path)
                    query = {p: value for p in params if "{" + p + "}" not in path}
                    if method == "get":
                        c.get(url, params=query)
                        sent += 1
                        continue
                    for field in sorted(fields) or [None]:
                        body = {"prompt": "x", **FAST}
                        if field:
                            body[field] = [value] if field == "init_images" else value
                        if field in ("override_settings",):
                            body[field] = {"sd_model_checkpoint": value}
                        c.request(method.upper(), url, params=query, json=body)
                        sent += 1
                    c.request(method.upper(), url, json={"prompt": f"x <lora:{value}:1>", **FAST})
                    c.request(method.upper(), url, json={"sd_model_checkpoint": value})
                    sent += 2
        touched = list(FileWatch.events)
    finally:
        FileWatch.needle = None
    assert touched == [], touched[:10]
    assert (probe / "victim.txt").read_text() == "keep me"
    assert sent > 400
    print(f"paths: {sent} requests carrying paths, 0 file-system events on them")


def test_cors_is_closed_unless_origins_are_given(make_client):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    closed = make_client()
    for r in (closed.options(f"{A}/txt2img", headers=preflight),
              closed.get(f"{A}/options", headers={"Origin": "http://evil.example"}),
              closed.get("/", headers={"Origin": "http://localhost:3000"})):
        assert not any(k.lower().startswith("access-control-") for k in r.headers), r.headers
    opened = make_client(cors_allow_origins=["http://localhost:3000"], api_auth=CREDS)
    ok = opened.options(f"{A}/txt2img", headers={**preflight, "Origin": "http://localhost:3000"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert ok.content in (b"OK", b"")  # a preflight answers headers only, never data
    evil = opened.options(f"{A}/txt2img", headers=preflight)
    assert "access-control-allow-origin" not in evil.headers
    r = opened.get(f"{A}/options", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 401  # the allowed origin still needs the credentials
    r = opened.get(f"{A}/options", headers={"Origin": "http://localhost:3000"}, auth=CREDS[0])
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-origin" not in opened.get(f"{A}/options", headers={"Origin": "http://evil.example"},
                                                           auth=CREDS[0]).headers


def test_limits_are_checked_before_compute(make_client, monkeypatch):
    from t2i.server import Limits
    from t2i.server.engine import Engine

    runs = []
    c = make_client(limits=Limits(max_side=64, max_steps=10, max_images=2, max_pixel_steps=64 * 64 * 10,
                                  max_body=64 * 1024, max_prompt=100))
    monkeypatch.setattr(Engine, "run", lambda *a, **k: runs.append(a) or pytest.fail("a refused job ran"))
    for body, status in [({"width": 72}, 422), ({"steps": 11}, 422), ({"batch_size": 3}, 422),
                         ({"width": 64, "height": 64, "steps": 10, "batch_size": 2}, 413),
                         ({"prompt": "x" * 101}, 413), ({"prompt": "x" * 70_000}, 413)]:
        assert c.post(f"{A}/txt2img", json={"prompt": "x", **FAST, **body}).status_code == status, body
    assert c.post(f"{A}/txt2img", content=b"{" + b" " * 70_000 + b"}",
                  headers={"content-type": "application/json"}).status_code == 413
    assert runs == []


@pytest.fixture
def poisoned(tmp_path, evil, tiny_sd):
    """LoRA, embedding and model folders each holding pickles under every name a server might list."""
    loras, embeddings, models = (tmp_path / n for n in ("loras", "embeddings", "models"))
    for folder in (loras, embeddings, models):
        folder.mkdir()
    for folder in (loras, embeddings):
        for name in ("evil.safetensors", "evil.ckpt", "evil.pt", "evil.bin", "evil.pth"):
            shutil.copy(evil(name, zip_format=name.endswith(".pt")), folder / name)
    for name in ("evil.safetensors", "evil.ckpt", "zipped.safetensors"):
        shutil.copy(evil(name, zip_format=name.startswith("zipped")), models / name)
    model = shutil.copytree(tiny_sd, models / "evil-folder")  # a diffusers folder whose UNet is a pickle
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    shutil.copy(evil("unet.bin"), model / "unet" / "diffusion_pytorch_model.bin")
    renamed = shutil.copytree(tiny_sd, models / "renamed-folder")  # a pickle under the safetensors name
    for weights in (renamed / "vae").glob("*.safetensors"):
        shutil.copy(evil("vae.safetensors"), weights)
    return loras, embeddings, models


def test_pickles_in_the_served_folders_are_refused_and_never_run(make_client, poisoned, marker):
    loras, embeddings, models = poisoned
    c = make_client(lora_dir=loras, embedding_dir=embeddings, model_dir=models)
    for route in ("refresh-checkpoints", "refresh-loras", "refresh-embeddings"):
        assert c.post(f"{A}/{route}").status_code == 200
    listed = {m["model_name"] for m in c.get(f"{A}/sd-models").json()}
    assert not {"evil", "evil-folder"} & {n for n in listed if n.endswith("ckpt")}
    assert c.get(f"{A}/loras").status_code == 200 and c.get(f"{A}/embeddings").status_code == 200
    assert {e for e in c.get(f"{A}/embeddings").json()["skipped"]} <= {"evil"}
    assert not marker.exists()
    tried = 0
    for name in sorted(listed - {"tiny-sd", "t2i-shapes"}):  # every listed checkpoint: switch, and one request
        r = c.post(f"{A}/options", json={"sd_model_checkpoint": name})
        assert r.status_code >= 400 and "Traceback" not in r.text and "\n" not in r.json()["detail"], r.text
        assert "--allow-pickle" not in r.text  # not a way out the server has
        r = c.post(f"{A}/txt2img", json={"prompt": "x", **FAST, "override_settings": {"sd_model_checkpoint": name}})
        assert r.status_code >= 400, r.text
        tried += 2
    for name in ("evil", "evil.ckpt", "evil.pt", "evil.bin"):  # LoRAs by any name
        r = c.post(f"{A}/txt2img", json={"prompt": f"x <lora:{name}:1>", **FAST})
        assert 400 <= r.status_code < 600 and "Traceback" not in r.text, r.text
        tried += 1
    assert not marker.exists()
    assert c.post(f"{A}/txt2img", json={"prompt": "x", **FAST}).status_code == 200  # and it goes on serving
    print(f"pickles: {len(listed - {'tiny-sd', 't2i-shapes'})} listed checkpoints and 4 LoRA names, {tried} "
          "requests, 0 payloads run")
