"""gen-demo's server (cli/demo.py) without a browser: what it serves and what it refuses. The page itself is
tested in Chromium by tests/test_web.py."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from genforge.cli.demo import demo_command, serve, serve_in_thread


@pytest.fixture
def fake_ort(tmp_path: Path) -> Path:
    """A stand-in for onnxruntime-web's dist directory (the server only needs its entry file to exist)."""
    ort = tmp_path / "ort"
    ort.mkdir()
    (ort / "ort.all.min.mjs").write_text("export {};\n")
    (ort / "ort-wasm-simd-threaded.wasm").write_bytes(b"\0asm")
    (tmp_path / "secret.txt").write_text("not for the browser")
    return ort


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, b"", dict(e.headers)


def test_the_server_serves_the_page_the_verified_bundle_and_nothing_else(family_bundles, fake_ort: Path) -> None:
    bundle = family_bundles["pixelcnn"]
    server = serve(str(bundle), port=0, ort=str(fake_ort))
    serve_in_thread(server)
    try:
        status, page, headers = _get(server.url)
        assert status == 200 and b"app.mjs" in page and headers["Content-Type"] == "text/html"
        # Threaded WebAssembly needs cross-origin isolation.
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        for name in ("app.mjs", "genforge.mjs"):
            status, _, headers = _get(server.url + name)
            assert status == 200 and headers["Content-Type"] == "text/javascript"
        status, wasm, headers = _get(server.url + "ort/ort-wasm-simd-threaded.wasm")
        assert status == 200 and wasm == b"\0asm" and headers["Content-Type"] == "application/wasm"
        # Every listed file, with the bytes its manifest hash names.
        for name, digest in server.manifest["files"].items():
            status, data, _ = _get(server.url + "bundle/" + name)
            assert status == 200 and hashlib.sha256(data).hexdigest() == digest, name
        for path in ("bundle/../../secret.txt", "bundle/%2e%2e/secret.txt", "ort/../secret.txt",
                     "ort/%2e%2e%2fsecret.txt", "bundle/", "ort/", "secret.txt", "bundle/nope.onnx", "pyproject.toml"):
            assert _get(server.url + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_gen_demo_says_in_one_line_what_is_missing(family_bundles, tmp_path: Path, fake_ort: Path) -> None:
    cases = [
        ([str(family_bundles["pixelcnn"]), "--ort", str(tmp_path)], "no onnxruntime-web"),
        ([str(tmp_path / "nowhere"), "--ort", str(fake_ort)], "no such bundle"),
    ]
    for args, why in cases:
        r = CliRunner().invoke(demo_command, args)
        assert r.exit_code != 0 and why in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_the_page_serves_a_zoo_model_by_name(fake_ort: Path) -> None:
    server = serve("zoo:gated-pixelcnn-bmnist", port=0, ort=str(fake_ort))
    serve_in_thread(server)
    try:
        assert server.manifest["model"] == "gated-pixelcnn"
        for name, digest in server.manifest["files"].items():
            status, data, _ = _get(server.url + "bundle/" + name)
            assert status == 200 and hashlib.sha256(data).hexdigest() == digest, name
    finally:
        server.shutdown()
        server.server_close()
