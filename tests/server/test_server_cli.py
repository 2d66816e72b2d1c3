"""`t2i serve`: bad arguments are one line and exit code 2 before any model loads; the bind warning."""

from __future__ import annotations

import pytest

from helpers import one_line


@pytest.mark.parametrize("args, words", [
    (["--port", "0"], "port 0 is out of range"),
    (["--port", "http"], "expected a port number"),
    (["--queue", "-1"], "--queue must be 0 or more"),
    (["--api-auth", "nopassword"], "--api-auth takes USER:PASS"),
    (["--api-auth", "a:b,:c"], "--api-auth takes USER:PASS"),
    (["--model-dir", "/no/such/folder"], "--model-dir /no/such/folder is not a folder"),
    (["--lora-dir", "/no/such/folder"], "--lora-dir /no/such/folder is not a folder"),
    (["--embedding-dir", "/no/such/folder"], "--embedding-dir /no/such/folder is not a folder"),
    (["--wildcard-dir", "/no/such/folder"], "--wildcard-dir /no/such/folder is not a folder"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--device", "tpu"], "invalid choice"),
    (["--devices", "cpu,,cpu"], "--devices takes a comma-separated list"),
    (["--speed", "warp9"], "unknown speed option 'warp9'"),
    (["--speed", "auto,compile"], "stands alone"),
    (["--speed", "cpu_offload", "--device", "cpu"], "cpu_offload needs CUDA devices"),
    (["--cors-allow-origins", "evil.example"], "is not an origin"),
    (["--cors-allow-origins", "http://ok.example/path"], "is not an origin"),
])
def test_bad_arguments(run_cli, no_model_load, monkeypatch, args, words):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    code, out, err = run_cli("serve", *args)
    assert code == 2
    assert words in one_line(err)


def test_out_is_checked_before_loading(run_cli, no_model_load, tmp_path):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli("serve", "--out", tmp_path / "file")
    assert code == 2 and "is a file" in one_line(err)


def _serve(run_cli, monkeypatch, *args):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    code, out, err = run_cli("serve", *args)
    return code, err, seen


def test_loopback_by_default_and_a_warning_for_an_open_bind(run_cli, monkeypatch, tiny_sd):
    code, err, seen = _serve(run_cli, monkeypatch, "--model", tiny_sd)
    assert code == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 7860
    assert "warning" not in err
    code, err, seen = _serve(run_cli, monkeypatch, "--model", tiny_sd, "--host", "0.0.0.0")
    assert seen["host"] == "0.0.0.0" and "without --api-auth" in err
    code, err, seen = _serve(run_cli, monkeypatch, "--model", tiny_sd, "--host", "0.0.0.0", "--api-auth", "a:b")
    assert "warning" not in err


def test_allow_pickle_is_not_a_serve_flag(run_cli, no_model_load):
    code, out, err = run_cli("serve", "--allow-pickle")
    assert code == 2 and "unrecognized arguments: --allow-pickle" in err


def test_cors_origins_and_the_any_origin_warning(run_cli, monkeypatch, tiny_sd):
    code, err, seen = _serve(run_cli, monkeypatch, "--model", tiny_sd, "--cors-allow-origins",
                             "http://localhost:3000, https://app.example/")
    assert code == 0 and seen["app"].state.server.config.cors_allow_origins == ["http://localhost:3000",
                                                                                "https://app.example"]
    assert "warning" not in err
    code, err, seen = _serve(run_cli, monkeypatch, "--model", tiny_sd, "--cors-allow-origins", "*")
    assert code == 0 and "--cors-allow-origins '*'" in err
