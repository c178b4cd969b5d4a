"""The bundle: a directory with ``manifest.json`` and the exported graphs.

The reader owns the format (the exporter imports these definitions), and validates everything before a
backend touches a file: the format name and version, the fields a sampler needs, every listed file's
presence and sha256. Anything it does not understand is a BundleError with one line naming the problem.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .randomness import SCHEME

BUNDLE_FORMAT = "genforge-bundle"
BUNDLE_VERSION = 6  # what the exporter writes; docs/bundle.md says what each version changed
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)  # 1 and 2 lack only optional fields, and may list inputs an ONNX file lacks
MANIFEST = "manifest.json"
GRAPH_FORMATS = ("onnx", "torchscript")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its file, format and I/O signature (the batch dimension is named "batch")."""

    name: str
    format: str
    file: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of sampled images."""
        s = self.manifest["image"]
        return int(s["height"]), int(s["width"]), int(s["channels"])

    @property
    def levels(self) -> int:
        return int(self.manifest["levels"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes") or 0)

    @property
    def formats(self) -> list[str]:
        return sorted({g["format"] for g in self.manifest["graphs"].values()})

    def graph(self, name: str, fmt: str) -> GraphSpec:
        key = f"{name}.{fmt}"
        g = self.manifest["graphs"].get(key)
        if g is None:
            have = ", ".join(sorted(self.manifest["graphs"])) or "none"
            raise BundleError(f"{self.path}: the bundle has no {fmt} graph {name!r} (it has: {have})")
        return GraphSpec(name, g["format"], g["file"], g["inputs"], g["outputs"])

    def file(self, graph: GraphSpec) -> Path:
        return self.path / graph.file


REQUIRED = ("format", "version", "family", "model", "model_config", "image", "levels", "graphs", "files")


def read_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle directory (or its manifest.json)."""
    p = Path(path)
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    manifest_path = p / MANIFEST
    if not p.exists():
        raise BundleError(f"{p}: no such bundle")
    if not manifest_path.is_file():
        raise BundleError(f"{p}: not a genforge bundle (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: corrupt manifest (not valid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a genforge bundle manifest (format is not {BUNDLE_FORMAT!r})")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise BundleError(
            f"{manifest_path}: bundle format version {manifest.get('version')!r} is not supported "
            f"(this genforge reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path}: manifest lacks field(s) {', '.join(missing)}")
    _check_schema(manifest, manifest_path)
    files = manifest["files"]
    graphs = manifest["graphs"]
    if not isinstance(files, dict) or not isinstance(graphs, dict) or not graphs:
        raise BundleError(f"{manifest_path}: manifest 'files' and 'graphs' must be non-empty objects")
    for key, g in graphs.items():
        if not isinstance(g, dict) or g.get("format") not in GRAPH_FORMATS or g.get("file") not in files:
            raise BundleError(f"{manifest_path}: graph {key!r} is malformed or names a file not in 'files'")
    _check_consistency(manifest, manifest_path)
    scheme = manifest.get("randomness")
    if scheme is not None and scheme != SCHEME:
        raise BundleError(f"{manifest_path}: the bundle's randomness scheme {scheme} is not this genforge's {SCHEME} "
                          "(seeded samples would differ from the ones it was exported for)")
    for name, digest in files.items():
        f = p / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{manifest_path}: file name {name!r} points outside the bundle")
        if not f.is_file():
            raise BundleError(f"{f}: missing bundle file")
        if verify_hashes and sha256_file(f) != digest:
            raise BundleError(f"{f}: sha256 does not match the manifest (the file was modified or truncated)")
    return Bundle(p, manifest)


SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every manifest this genforge reads must satisfy."""
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def _check_schema(manifest: dict[str, Any], where: Path) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(manifest_schema()).iter_errors(manifest))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise BundleError(f"{where}: manifest does not follow the bundle schema at {at}: {error.message}")


FAMILY_GRAPHS = {"autoregressive": ("forward",), "latent": ("encode", "decode"), "gan": ("generate",)}
FAMILIES = tuple(FAMILY_GRAPHS)


def _check_consistency(manifest: dict[str, Any], where: Path) -> None:
    """The manifest's own fields must agree: family, image, levels and classes with the model config, and
    with every graph's declared shapes (the graphs' files are authenticated by their hashes, the manifest
    is not, so an edited field must not quietly reshape what the graphs compute)."""
    family = manifest["family"]
    if family not in FAMILIES:
        raise BundleError(f"{where}: unknown model family {family!r} (this genforge knows {', '.join(FAMILIES)})")
    have = {key.rsplit(".", 1)[0] for key in manifest["graphs"]}
    needed = [g for g in FAMILY_GRAPHS[family] if g not in have]
    if needed:
        raise BundleError(f"{where}: family {family!r} needs graph(s) {', '.join(needed)}, which the manifest lacks")
    if family != "autoregressive" and not isinstance(manifest.get("latent_size"), int):
        raise BundleError(f"{where}: family {family!r} needs an integer latent_size")
    image, cfg = manifest["image"], manifest["model_config"]
    try:
        c, h, w = int(image["channels"]), int(image["height"]), int(image["width"])
        levels, classes = int(manifest["levels"]), int(manifest.get("num_classes") or 0)
    except (TypeError, KeyError, ValueError) as e:
        raise BundleError(f"{where}: malformed image or levels field ({e})") from None
    if not isinstance(cfg, dict):
        raise BundleError(f"{where}: model_config must be an object")
    for key, value in (("channels", c), ("height", h), ("width", w), ("levels", levels), ("num_classes", classes)):
        if key in cfg and cfg[key] != value:
            raise BundleError(f"{where}: the manifest says {key} {value} but its model_config says {cfg[key]}")
    # Shapes after the batch dimension that a graph input or output of this name must have.
    expected = {"x": [c, h, w], "x_mean": [c, h, w], "x_row": [c, w], "x_prev_row": [c, w], "uniforms": [h, w, c],
                "prefix": [h, w, c], "images": [h, w, c]}
    for key, g in manifest["graphs"].items():
        for spec in [*g.get("inputs", []), *g.get("outputs", [])]:
            if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list) or "name" not in spec:
                raise BundleError(f"{where}: graph {key!r} has a malformed input or output entry")
            name, shape = spec["name"], spec["shape"]
            want = expected.get(name)
            if name == "log_probs":
                ok = len(shape) >= 3 and shape[1] == c and shape[-1] == levels
            else:
                ok = want is None or shape[1:] == want
            if not ok:
                raise BundleError(f"{where}: graph {key!r} declares {name} of shape {shape}, which does not fit the "
                                  f"manifest's image (height {h}, width {w}, channels {c}) with {levels} levels")
