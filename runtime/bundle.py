"""The bundle: a directory with ``manifest.json`` and the exported graphs.

The reader owns the format (the exporter imports these definitions), and validates everything before a
backend touches a file: the format name and version, the fields a sampler needs, every listed file's
presence and sha256. Anything it does not understand is a BundleError with one line naming the problem.

A bundle is untrusted input. Every file it names is read once, here, through no symbolic link and only
if it is a regular file inside the bundle directory; its bytes are hashed and kept, and the backends build
their sessions from those bytes (``Bundle.read``), so a file swapped after ``load()`` is never run. An ONNX
graph's external data must be files the manifest lists (and so hashes), at offsets inside them
(``runtime/onnx_scan.py``): since format 8 every ONNX graph reads its weights from ``weights.safetensors``
itself and the tensors only a graph has (a step's kernel columns...) from one shared ``onnx.data``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import zoo
from .errors import BundleError
from .onnx_scan import external_tensors
from .randomness import SCHEME

BUNDLE_FORMAT = "genforge-bundle"
BUNDLE_VERSION = 8  # what the exporter writes; docs/bundle.md says what each version changed
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)  # 1 and 2 lack only optional fields, may list inputs a file lacks
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
    method: str = "forward"  # TorchScript: the archive's method that runs it (format 8: one archive, many graphs)

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
    # The bytes of every listed file as read and hashed by read_bundle; backends load from these.
    contents: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

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
        method = g.get("method", "forward") if int(self.manifest["version"]) >= 8 else "forward"
        return GraphSpec(name, g["format"], g["file"], g["inputs"], g["outputs"], method)

    def file(self, graph: GraphSpec) -> Path:
        """Where the graph's file was read from (for messages; load its bytes with ``read``)."""
        return self.path / graph.file

    def read(self, name: str) -> bytes:
        """The verified bytes of a listed file, as read at load time."""
        data = self.contents.get(name)
        if data is None:
            raise BundleError(f"{self.path}: {name!r} is not one of the bundle's verified files")
        return data

    def external_data(self, graph: GraphSpec) -> list[str]:
        """The listed files an ONNX graph reads as external data (checked at load)."""
        return sorted({t.location for t in external_tensors(self.read(graph.file), self.file(graph))})


REQUIRED = ("format", "version", "family", "model", "model_config", "image", "levels", "graphs", "files")


MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything this large is not one

# The manifest fields that change what a graph's outputs mean (how many levels a GAN's [-1, 1] output is
# rounded to, which prior a VAE samples, the caches' shapes...) and that no graph states. Since version 7 the
# exporter copies them into the weights file's safetensors metadata under BINDING_KEY, and a reader refuses a
# manifest that contradicts that copy: the weights are hashed, so editing the manifest alone is detected.
BOUND_FIELDS = ("family", "model", "model_config", "image", "levels", "num_classes", "likelihood", "latent_size",
                "prior", "caches")
BINDING_KEY = "genforge.manifest"
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit


def manifest_binding(manifest: dict[str, Any]) -> str:
    """The BOUND_FIELDS of a manifest as the JSON text the exporter stores beside the weights."""
    return json.dumps({k: manifest[k] for k in BOUND_FIELDS if k in manifest}, sort_keys=True)


def safetensors_header(raw: bytes, where: object) -> tuple[int, dict[str, Any]]:
    """(offset where the tensor data starts, the JSON header) of a safetensors file's bytes, checked."""
    if len(raw) < 8:
        raise BundleError(f"{where}: not a safetensors file (shorter than its header)")
    size = int.from_bytes(raw[:8], "little")
    if size > min(len(raw) - 8, MAX_SAFETENSORS_HEADER):
        raise BundleError(f"{where}: not a safetensors file (its header length {size} exceeds the file)")
    try:
        header = json.loads(raw[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BundleError(f"{where}: not a safetensors file (its header is not JSON)") from None
    return 8 + size, header if isinstance(header, dict) else {}


def safetensors_metadata(raw: bytes, where: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file, read from its header without loading a tensor."""
    meta = safetensors_header(raw, where)[1].get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def check_binding(manifest: dict[str, Any], contents: dict[str, bytes], root: Path) -> None:
    """Version 7 on: the manifest's BOUND_FIELDS must equal the copy in the weights file's metadata."""
    if int(manifest["version"]) < 7:
        return  # older exporters wrote no copy; their bound fields are trusted (docs/bundle.md)
    weights = manifest.get("weights")
    if not isinstance(weights, str) or weights not in contents:
        raise BundleError(f"{root / MANIFEST}: a version-7 bundle names its weights file, listed in 'files'")
    recorded = safetensors_metadata(contents[weights], root / weights).get(BINDING_KEY)
    try:
        bound = json.loads(recorded) if isinstance(recorded, str) else None
    except (json.JSONDecodeError, RecursionError):
        bound = None
    if not isinstance(bound, dict):
        raise BundleError(f"{root / weights}: the weights lack the manifest fields they were exported with "
                          f"({BINDING_KEY!r} metadata)")
    for key in BOUND_FIELDS:
        have, want = manifest.get(key), bound.get(key)
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):  # name the entry: model_config.levels
            sub = next(k for k in sorted({*have, *want}) if have.get(k) != want.get(k))
            key, have, want = f"{key}.{sub}", have.get(sub), want.get(sub)
        raise BundleError(f"{root / MANIFEST}: manifest field {key!r} is {_short(have)} but the weights were "
                          f"exported with {_short(want)} (the manifest was edited)")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def read_bundle(path: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Read and validate a bundle directory (or its manifest.json), and read its files."""
    if not isinstance(path, (str, os.PathLike)):
        raise BundleError(f"a bundle path must be a str or a path, got {type(path).__name__}")
    if not os.fspath(path):
        raise BundleError("the bundle path is empty")
    p = Path(zoo.resolve(path))
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    manifest_path = p / MANIFEST
    if not p.exists():
        raise BundleError(f"{p}: no such bundle")
    if not p.is_dir():
        raise BundleError(f"{p}: not a genforge bundle (a bundle is a directory holding {MANIFEST})")
    if not manifest_path.exists() and not manifest_path.is_symlink():
        raise BundleError(f"{p}: not a genforge bundle (no {MANIFEST})")
    raw = read_inside(p, MANIFEST, limit=MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: corrupt manifest (not valid JSON: {e})") from None
    except RecursionError:
        raise BundleError(f"{manifest_path}: corrupt manifest (nested too deeply)") from None
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
    try:
        _check_schema(manifest, manifest_path)
    except RecursionError:
        raise BundleError(f"{manifest_path}: corrupt manifest (nested too deeply)") from None
    files = manifest["files"]
    graphs = manifest["graphs"]
    if not isinstance(files, dict) or not isinstance(graphs, dict) or not graphs:
        raise BundleError(f"{manifest_path}: manifest 'files' and 'graphs' must be non-empty objects")
    for key, g in graphs.items():
        if not isinstance(g, dict) or g.get("format") not in GRAPH_FORMATS or g.get("file") not in files:
            raise BundleError(f"{manifest_path}: graph {key!r} is malformed or names a file not in 'files'")
    _check_consistency(manifest, manifest_path)
    if int(manifest["version"]) >= 4:
        _check_wiring(manifest, manifest_path)
    if int(manifest["version"]) >= 8:
        for key, g in graphs.items():
            if g["format"] == "torchscript" and g.get("method") != key.rsplit(".", 1)[0]:
                raise BundleError(f"{manifest_path}: graph {key!r} must name its own method of the TorchScript "
                                  f"archive ('method': {key.rsplit('.', 1)[0]!r}), not {g.get('method')!r}")
    scheme = manifest.get("randomness")
    if scheme is not None and scheme != SCHEME:
        raise BundleError(f"{manifest_path}: the bundle's randomness scheme {scheme} is not this genforge's {SCHEME} "
                          "(seeded samples would differ from the ones it was exported for)")
    contents: dict[str, bytes] = {}
    for name, digest in files.items():
        check_member_name(name, manifest_path)
        data = read_inside(p, name)
        if verify_hashes and hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"{p / name}: sha256 does not match the manifest (the file was modified or truncated)")
        contents[name] = data
    check_binding(manifest, contents, p)
    bundle = Bundle(p, manifest, contents)
    for g in graphs.values():
        if g["format"] == "onnx":
            check_external_data(bundle, g["file"])
    return bundle


def check_external_data(bundle: Bundle, file: str) -> None:
    """Every tensor an ONNX file keeps outside itself must lie inside a file the manifest lists (and so
    hashes): a listed name, and an offset and length within that file's verified bytes."""
    where = bundle.path / file
    for t in external_tensors(bundle.read(file), where):
        loc = t.location
        check_member_name(loc, where, what="external data")
        if loc not in bundle.contents:
            raise BundleError(f"{where}: external data {loc!r} is not a file the manifest lists and hashes")
        size = len(bundle.contents[loc])
        try:
            offset = int(t.entries.get("offset", "0"))
            length = int(t.entries.get("length", str(size - offset)))
        except ValueError:
            raise BundleError(f"{where}: tensor {t.name!r} has a malformed external-data offset or length") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise BundleError(f"{where}: tensor {t.name!r} reads bytes {offset}..{offset + length} of {loc!r}, "
                              f"which has {size}")


def check_member_name(name: str, where: Path, *, what: str = "file name") -> None:
    """A name inside a bundle: relative, no '..', no empty or odd parts (a bundle is one flat directory tree)."""
    parts = name.replace("\\", "/").split("/")
    if (not name or Path(name).is_absolute() or name.startswith(("/", "\\")) or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts) or "\x00" in name):
        raise BundleError(f"{where}: {what} {name!r} points outside the bundle")


def read_inside(root: Path, name: str, *, limit: int | None = None) -> bytes:
    """The bytes of ``root/name``, refusing a symbolic link at any level below ``root``, anything that is
    not a regular file, and (with ``limit``) files larger than ``limit``."""
    where = root / name
    current = root
    for part in Path(name).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise BundleError(f"{where}: missing bundle file") from None
        except OSError as e:
            raise BundleError(f"{where}: cannot read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{where}: a symbolic link ({current.name}); bundle files must lie inside the bundle")
    try:
        fd = os.open(where, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BundleError(f"{where}: cannot read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{where}: not a regular file")
        if limit is not None and st.st_size > limit:
            raise BundleError(f"{where}: {st.st_size} bytes, more than the {limit} a bundle's {name} may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise BundleError(f"{where}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


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


# The inputs each graph takes before its caches (then "labels" last, for a conditional model), by graph name.
GRAPH_INPUTS = {"forward": ["x"], "row": ["x_prev_row", "has_prev"], "step": ["x_row", "j"],
                "step_updates": ["x_row", "j"], "window": ["x_rows", "advance"],
                "sample": ["uniforms", "prefix", "start_row"], "encode": ["x"], "decode": ["z"], "generate": ["z"]}
SCALAR_INPUTS = ("has_prev", "j", "advance", "start_row")  # shape [1]
CACHED_GRAPHS = ("row", "step", "step_updates", "window")


def _check_wiring(manifest: dict[str, Any], where: Path) -> None:
    """Version 4 on: each graph's inputs, outputs and state are wired as the exporter wires them (the names,
    their order, the caches they carry and those caches' shapes), since the runtime builds its feeds from
    these entries; anything else is refused here rather than failing inside a decoder."""
    caches = manifest.get("caches") or []
    if not isinstance(caches, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                               and isinstance(c.get("shape"), list) for c in caches):
        raise BundleError(f"{where}: malformed 'caches'")
    cache_shape = {c["name"]: c["shape"] for c in caches}
    for c in caches:
        shape = c["shape"]
        if (len(shape) < 2 or shape[0] != "batch"
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape[1:])):
            raise BundleError(f"{where}: cache {c['name']!r} has shape {shape}; expected ['batch', sizes...]")
    labels = ["labels"] if int(manifest.get("num_classes") or 0) else []
    for key, g in manifest["graphs"].items():
        name = key.rsplit(".", 1)[0]
        fixed = GRAPH_INPUTS.get(name)
        if fixed is None:
            raise BundleError(f"{where}: unknown graph {key!r}")
        if g.get("role", name) != name:
            raise BundleError(f"{where}: graph {key!r} has role {g.get('role')!r}")
        inputs = {i["name"]: i["shape"] for i in g["inputs"]}
        outputs = [o["name"] for o in g["outputs"]]
        state = g.get("state") or []
        carried: list[str] = []
        if name in CACHED_GRAPHS:
            if not isinstance(state, list) or not all(isinstance(e, dict) for e in state) or [
                    e.get("cache") for e in state] != list(cache_shape):
                raise BundleError(f"{where}: graph {key!r} must carry every cache of 'caches', in order")
            for e in state:
                if e.get("input") not in (None, f"cache_{e['cache']}") or e.get("output") not in (
                        None, f"new_{e['cache']}"):
                    raise BundleError(f"{where}: graph {key!r} wires cache {e['cache']!r} to other tensors")
                if e["input"] is not None:
                    carried.append(e["input"])
                    if inputs.get(e["input"]) != cache_shape[e["cache"]]:
                        raise BundleError(f"{where}: graph {key!r} declares {e['input']} of shape "
                                          f"{inputs.get(e['input'])}, but cache {e['cache']!r} is "
                                          f"{cache_shape[e['cache']]}")
            new = [f"new_{e['cache']}" for e in state if e.get("output")]
            want_out = {"row": new, "step": ["log_probs", *new], "window": ["log_probs", *new]}.get(name)
            if want_out is not None and outputs != want_out:
                raise BundleError(f"{where}: graph {key!r} returns {outputs}, expected {want_out}")
            if name == "step_updates":
                _check_updates(g, outputs, cache_shape, key, where)
        elif state:
            raise BundleError(f"{where}: graph {key!r} carries no caches")
        want_in = [*fixed, *carried, *labels]
        if list(inputs) != want_in or len(inputs) != len(g["inputs"]):
            raise BundleError(f"{where}: graph {key!r} takes {[i['name'] for i in g['inputs']]}, expected {want_in}")
        for n in SCALAR_INPUTS:
            if n in inputs and inputs[n] != [1]:
                raise BundleError(f"{where}: graph {key!r} declares {n} of shape {inputs[n]}, expected [1]")
        if labels and inputs["labels"] != ["batch"]:
            raise BundleError(f"{where}: graph {key!r} declares labels of shape {inputs['labels']}")


def _check_updates(g: dict[str, Any], outputs: list[str], cache_shape: dict[str, Any], key: str, where: Path) -> None:
    updates = g.get("updates")
    if not isinstance(updates, list) or not updates or outputs[:1] != ["log_probs"]:
        raise BundleError(f"{where}: graph {key!r} needs log_probs first and a non-empty 'updates'")
    named = set(outputs[1:])
    for u in updates:
        if not isinstance(u, dict) or u.get("cache") not in cache_shape or u.get("kind") not in ("column", "span"):
            raise BundleError(f"{where}: graph {key!r} has a malformed entry in 'updates'")
        if u.get("value") not in named or (u["kind"] == "column") != (u.get("index") in named):
            raise BundleError(f"{where}: graph {key!r} 'updates' name outputs the graph lacks")
        offset, axis = u.get("offset"), u.get("axis", 2)
        if u["kind"] == "span" and not (isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0):
            raise BundleError(f"{where}: graph {key!r} has a span update without a valid offset")
        if axis not in (1, 2) or isinstance(axis, bool):
            raise BundleError(f"{where}: graph {key!r} has an update along axis {axis!r}")
