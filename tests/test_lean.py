"""Bundle format 8: each tensor once per format (export/lean.py), older bundles still load and sample alike,
and external data that reaches past its file is refused."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from genforge.export import export_run
from genforge.export.lean import MIN_EXTERNAL_BYTES, ONNX_DATA, _Derivations, externalize_onnx, safetensors_offsets
from genforge.runtime import BundleError, load, read_bundle
from genforge.runtime.bundle import BUNDLE_VERSION, sha256_file

FORMAT7 = Path(__file__).parent / "data" / "format7"


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _rehash(b: Path, m: dict) -> None:
    m["files"] = {f: sha256_file(b / f) for f in m["files"]}
    (b / "manifest.json").write_text(json.dumps(m))


def _all_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    out = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                out += _all_tensors(sub)
    return out


@pytest.mark.parametrize("name", ["pixelcnn", "gated-pixelcnn", "row-lstm", "diagonal-bilstm", "pixelcnn-rgb", "vae",
                                  "gan"])
def test_each_tensor_is_stored_once_per_format(family_bundles, name: str) -> None:
    b = family_bundles[name]
    m = _manifest(b)
    assert m["version"] == BUNDLE_VERSION == 8
    weights = (b / m["weights"]).read_bytes()
    in_weights = safetensors_offsets(weights)
    derivations = _Derivations(b / m["weights"])
    data = (b / ONNX_DATA).read_bytes() if (b / ONNX_DATA).exists() else b""
    regions: dict[tuple[int, int], bytes] = {}
    onnx_files = {g["file"] for g in m["graphs"].values() if g["format"] == "onnx"}
    for file in sorted(onnx_files):
        proto = onnx.load(str(b / file), load_external_data=False)
        assert not any(n.metadata_props for n in proto.graph.node), f"{file}: exporter provenance kept"
        # the runtime's own wire-format scan (it imports no onnx) finds exactly what onnx's parser does
        scanned = sorted((t.name, sorted(t.entries.items())) for t in _external(b / file))
        parsed = sorted((t.name, sorted((e.key, e.value) for e in t.external_data)) for t in _all_tensors(proto.graph)
                        if t.data_location == onnx.TensorProto.EXTERNAL)
        assert scanned == parsed, file
        for t in _all_tensors(proto.graph):
            if t.data_location != onnx.TensorProto.EXTERNAL:
                assert len(numpy_helper.to_array(t).tobytes()) < MIN_EXTERNAL_BYTES, (file, t.name)
                continue
            entries = {e.key: e.value for e in t.external_data}
            offset, length = int(entries["offset"]), int(entries["length"])
            if entries["location"] == m["weights"]:
                assert (offset, length) in in_weights.values(), (file, t.name)  # a whole weight, not a slice
            else:
                assert entries["location"] == ONNX_DATA
                raw = data[offset : offset + length]
                assert hashlib.sha256(raw).digest() not in in_weights, f"{file}: {t.name} copies a weight"
                array = np.frombuffer(raw, onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(t.dims)
                assert derivations.find(array, raw) is None, f"{file}: {t.name} is a weight's elements, permuted"
                regions[(offset, length)] = raw
    # onnx.data: every region distinct, and nothing in it that no graph reads (but alignment padding)
    assert len({hashlib.sha256(r).digest() for r in regions.values()}) == len(regions)
    assert sum(length for _, length in regions) <= len(data) < sum(length + 64 for _, length in regions) + 1
    ts = {g["file"] for g in m["graphs"].values() if g["format"] == "torchscript"}
    assert ts == {"graphs.pt"}
    with zipfile.ZipFile(b / "graphs.pt") as z:
        blobs = [z.read(i) for i in z.infolist() if "/constants/" in i.filename and not i.filename.endswith(".pkl")]
        # no debug records: they hold the exporter's source text and the exporting machine's paths
        assert not [i.filename for i in z.infolist() if i.filename.endswith(".debug_pkl")]
        source_dir = str(Path(inspect.getfile(export_run)).parents[1]).encode()  # the package's folder
        assert not [i.filename for i in z.infolist() if source_dir in z.read(i)], "the archive names local files"
    big = [hashlib.sha256(x).digest() for x in blobs if len(x) >= MIN_EXTERNAL_BYTES]
    assert len(set(big)) == len(big), "the TorchScript archive stores a tensor twice"


def test_a_tensor_folded_out_of_a_weight_is_made_from_it_not_stored(tmp_path: Path) -> None:
    """The forms an exporter folds out of a weight (one tap of a (k, 1) kernel, transposed; a 1x1 kernel as a
    matrix; the top rows of a kernel laid out (kh, kw, in, out), or as (out, in, rows, kw) for a folded masked
    convolution's kept part) become nodes reading the weight, and the graph
    computes what it did, bit for bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from safetensors.numpy import save_file

    rng = np.random.default_rng()
    w = rng.standard_normal((24, 16, 3, 1)).astype(np.float32)  # (out, in, k, 1)
    p = rng.standard_normal((24, 16, 1, 1)).astype(np.float32)
    k = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    derived = {"tap": np.ascontiguousarray(w[:, :, int(rng.integers(3)), 0].T),  # (in, out)
               "point": np.ascontiguousarray(p[:, :, 0, 0].T),
               "top": np.ascontiguousarray(k.transpose(2, 3, 1, 0)[:2].reshape(2 * 3 * 16, 8)),
               "kept": np.ascontiguousarray(k[:, :, :2]),  # (out, in, 2, kw): no run of k's elements as it is
               "other": rng.standard_normal((16, 24)).astype(np.float32)}  # no weight's: stays stored
    save_file({"w": w, "p": p, "k": k}, str(tmp_path / "weights.safetensors"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 16])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 120])
    names = ["tap", "point", "top", "kept", "other"]
    nodes = [helper.make_node("MatMul", ["x", "tap"], ["a"]), helper.make_node("MatMul", ["x", "point"], ["b"]),
             helper.make_node("MatMul", ["x", "other"], ["d"]),
             helper.make_node("Concat", ["a", "b", "d"], ["abd"], axis=1),
             helper.make_node("Reshape", ["top", "flat"], ["tf"]), helper.make_node("Slice", ["tf", "s0", "s1"], ["t"]),
             helper.make_node("Reshape", ["t", "shape"], ["c"]),
             helper.make_node("Reshape", ["kept", "flat"], ["kf"]),
             helper.make_node("Slice", ["kf", "s0", "s1"], ["ks"]), helper.make_node("Reshape", ["ks", "shape"], ["e"]),
             helper.make_node("Concat", ["abd", "c", "e"], ["z"], axis=1)]
    inits = [numpy_helper.from_array(derived[n], n) for n in names] + [
        numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
        (("flat", [-1]), ("s0", [0]), ("s1", [120]), ("shape", [5, 24]))]
    graph = helper.make_graph(nodes, "g", [x], [z], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    xs = rng.standard_normal((5, 16)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": xs})[0]

    stats = externalize_onnx([path], tmp_path / "weights.safetensors")
    assert stats["tensors_derived"] == 4
    proto = onnx.load(str(path), load_external_data=False)
    stored = [{e.key: e.value for e in t.external_data}["location"] for t in proto.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL]
    assert sorted(stored) == [ONNX_DATA] + ["weights.safetensors"] * 3  # "other"; the three weights, read whole
    assert (tmp_path / ONNX_DATA).stat().st_size == derived["other"].nbytes
    after = ort.InferenceSession(str(path)).run(None, {"x": xs})[0]
    assert np.array_equal(before, after)


@pytest.mark.slow
def test_a_format_7_bundle_still_loads_and_samples_as_its_format_8_export(tmp_path: Path) -> None:
    """A committed version-7 bundle (one archive per graph, tensors inline) of a committed tiny run: both
    backends load it and draw exactly the images of the same run exported now."""
    old = FORMAT7 / "bundle"
    assert _manifest(old)["version"] == 7 and (old / "step.pt").exists()
    run = shutil.copytree(FORMAT7 / "run", tmp_path / "run")
    new = export_run(run, tmp_path / "b8", formats=("onnx", "torchscript"))
    assert _manifest(new)["version"] == 8
    for backend in ("onnx", "torchscript"):
        a, b = load(old, backend=backend), load(new, backend=backend)
        np.testing.assert_array_equal(a.sample(5, seed=7, decoder="cached"), b.sample(5, seed=7, decoder="cached"))
        x = b.sample(2, seed=1)
        np.testing.assert_allclose(a.log_prob(x), b.log_prob(x), rtol=0, atol=1e-4)


def test_external_data_past_the_end_of_its_file_is_refused(family_bundles, tmp_path: Path) -> None:
    # the gated one: the tiny PixelCNN's tensors are all under MIN_EXTERNAL_BYTES, so all inline
    b = shutil.copytree(family_bundles["gated-pixelcnn"], tmp_path / "b")
    m = _manifest(b)
    protos = {f: onnx.load(str(b / f), load_external_data=False)
              for f in sorted({g["file"] for g in m["graphs"].values() if g["format"] == "onnx"})}
    file, t = next((f, t) for f, p in protos.items() for t in p.graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e for e in t.external_data}
    entries["offset"].value = str(len((b / entries["location"].value).read_bytes()) - 4)
    (b / file).write_bytes(protos[file].SerializeToString())
    _rehash(b, m)
    with pytest.raises(BundleError, match=rf"{file.replace('.', '[.]')}: tensor .* reads bytes .* which has"):
        read_bundle(b)


def test_a_torchscript_graph_must_name_its_own_method(family_bundles, tmp_path: Path) -> None:
    b = shutil.copytree(family_bundles["pixelcnn"], tmp_path / "b")
    m = _manifest(b)
    m["graphs"]["step.torchscript"]["method"] = "window"  # same archive, another graph's code
    _rehash(b, m)
    with pytest.raises(BundleError, match="must name its own method"):
        read_bundle(b)
    del m["graphs"]["step.torchscript"]["method"]
    _rehash(b, m)
    with pytest.raises(BundleError, match="method"):
        read_bundle(b)


# The goal (issue 25): each format's files at most 1.3x the weights at the default sizes.
@pytest.mark.slow
@pytest.mark.parametrize("model", ["pixelcnn", "gated-pixelcnn", "row-lstm", "diagonal-bilstm", "vae", "gan"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_default_size_bundle_is_within_the_size_goal(default_bundles, model: str, fmt: str) -> None:
    b = default_bundles[model]
    m = _manifest(b)
    files = {g["file"] for g in m["graphs"].values() if g["format"] == fmt}
    if fmt == "onnx":
        files |= {t.location for f in files for t in _external(b / f)}
    from safetensors.numpy import load_file

    weights = sum(a.nbytes for a in load_file(str(b / m["weights"])).values())
    ratio = sum((b / f).stat().st_size for f in files - {m["weights"]}) / weights
    assert ratio <= 1.3, f"{model} {fmt}: {ratio:.2f}x the weights"


def _external(path: Path) -> list:
    from genforge.runtime.onnx_scan import external_tensors

    return external_tensors(path.read_bytes())


@pytest.fixture(scope="module")
def default_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family at its default architecture (one training step on the 8x8 digits), exported with every
    format: the sizes the goal is about."""
    from genforge.train import DataSpec, TrainConfig, train_run

    root = tmp_path_factory.mktemp("default-size")
    out = {}
    for model in ("pixelcnn", "gated-pixelcnn", "row-lstm", "diagonal-bilstm", "vae", "gan"):
        run = train_run(model=model, data=DataSpec(), out=root / model, progress=False,
                        train=TrainConfig(steps=1, batch_size=8, n_samples=0, eval_limit=8))
        out[model] = export_run(run.run_dir, root / f"{model}-bundle", formats=("onnx", "torchscript"))
    return out
