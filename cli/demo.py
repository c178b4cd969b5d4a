"""``gen-demo``: serves the browser page (``runtime/web/``) with one bundle on localhost. The page samples and
completes images in the browser with onnxruntime-web; this server only hands out static files: the page, the
bundle's files as read and verified by ``read_bundle`` (from memory, so the bytes the browser gets are the
bytes whose hashes were checked), and onnxruntime-web's files from npm."""

from __future__ import annotations

import http.server
import json
import mimetypes
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

from .common import one_line_errors

WEB_DIR = Path(__file__).resolve().parent.parent / "runtime" / "web"
PAGE_FILES = ("index.html", "app.mjs", "genforge.mjs")
# Where `npm ci` in examples/web puts onnxruntime-web, for a source checkout (also GENFORGE_ORT_WEB or --ort).
DEFAULT_ORT = Path(__file__).resolve().parent.parent / "examples" / "web" / "node_modules" / "onnxruntime-web" / "dist"
ORT_ENTRY = "ort.all.min.mjs"  # the build with both the WebAssembly and the WebGPU backends

TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".html": "text/html",
         ".json": "application/json", ".map": "application/json"}


def find_ort(ort: str | None) -> Path:
    """onnxruntime-web's dist directory: ``ort``, else $GENFORGE_ORT_WEB, else examples/web's npm install."""
    where = Path(ort or os.environ.get("GENFORGE_ORT_WEB") or DEFAULT_ORT)
    if not (where / ORT_ENTRY).is_file():
        raise click.ClickException(
            f"{where}: no onnxruntime-web ({ORT_ENTRY}); run `npm ci` in examples/web, or pass --ort DIR "
            "(the package's dist directory)"
        )
    return where


def bundle_files(path: str) -> tuple[dict, dict[str, bytes]]:
    """(manifest, name -> bytes) of an autoregressive bundle with ONNX graphs, read and verified."""
    from genforge.runtime import read_bundle

    bundle = read_bundle(path)
    if bundle.family != "autoregressive":
        raise click.ClickException(
            f"{bundle.path}: a {bundle.model} bundle; the page samples autoregressive bundles (PixelCNN, Gated "
            "PixelCNN, PixelRNN)"
        )
    missing = [g for g in ("forward.onnx", "row.onnx", "step.onnx") if g not in bundle.manifest["graphs"]]
    if missing:
        raise click.ClickException(
            f"{bundle.path}: no {', '.join(missing)} (export it with --format onnx or all for the page)"
        )
    return bundle.manifest, dict(bundle.contents)


class DemoServer(http.server.ThreadingHTTPServer):
    """Serves ``/`` (the page), ``/bundle/NAME`` (the bundle's verified files) and ``/ort/NAME``
    (onnxruntime-web). Nothing else: no directory listings, no path outside those three sets."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], manifest: dict, files: Mapping[str, bytes], ort_dir: Path) -> None:
        self.manifest, self.files, self.ort_dir = manifest, dict(files), ort_dir.resolve()
        self.files["manifest.json"] = json.dumps(manifest).encode()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def lookup(self, path: str) -> tuple[bytes, str] | None:
        """(bytes, content type) served at URL path ``path``, or None."""
        if path in ("/", "/index.html"):
            name = "index.html"
            return (WEB_DIR / name).read_bytes(), TYPES[".html"]
        if path.startswith("/bundle/"):
            name = path.removeprefix("/bundle/")
            data = self.files.get(name)
            return (data, TYPES.get(Path(name).suffix, "application/octet-stream")) if data is not None else None
        if path.startswith("/ort/"):
            name = path.removeprefix("/ort/")
            target = (self.ort_dir / name).resolve()
            if "/" in name or target.parent != self.ort_dir or not target.is_file():
                return None
            return target.read_bytes(), TYPES.get(target.suffix, "application/octet-stream")
        name = path.lstrip("/")
        if name in PAGE_FILES:
            return (WEB_DIR / name).read_bytes(), TYPES[Path(name).suffix]
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: DemoServer

    def do_GET(self) -> None:
        found = self.server.lookup(unquote(urlsplit(self.path).path))
        if found is None:
            self.send_error(404)
            return
        data, kind = found
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        # Cross-origin isolation: onnxruntime-web's threaded WebAssembly needs SharedArrayBuffer.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a page load is dozens of requests; the command prints the URL and errors only


def serve(bundle: str, *, host: str = "127.0.0.1", port: int = 8000, ort: str | None = None) -> DemoServer:
    """A DemoServer for ``bundle`` bound to host:port (port 0: any free one), not yet serving."""
    mimetypes.add_type("text/javascript", ".mjs")
    ort_dir = find_ort(ort)
    manifest, files = bundle_files(bundle)
    try:
        return DemoServer((host, port), manifest, files, ort_dir)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve_in_thread(server: DemoServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="gen-demo", daemon=True)
    thread.start()
    return thread


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--ort", type=click.Path(file_okay=False), default=None,
              help="onnxruntime-web's dist directory (default: $GENFORGE_ORT_WEB, else examples/web's npm ci).")
@one_line_errors
def demo_command(bundle: str, host: str, port: int, ort: str | None) -> None:
    """Serve the browser page with BUNDLE: samples for a seed, a class picker, live completion of drawn rows."""
    server = serve(bundle, host=host, port=port, ort=ort)
    click.echo(f"serving {server.manifest['model']} bundle {bundle} at {server.url}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
