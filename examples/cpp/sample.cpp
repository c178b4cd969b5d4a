// Sample images from a genforge bundle in C++ with libtorch (the TorchScript graphs), written from
// docs/bundle.md alone.
//
//   ./sample BUNDLE [--n 4] [--seed 0] [--start 0] [--out result.json]
//
// Runs the row/step protocol on the row and step graphs (v8: methods of graphs.pt; before: row.pt, step.pt),
// pairing the caches as the manifest's "state" says, draws
// the uniforms with the bundle's randomness scheme (Philox4x32-10) and applies the inverse-CDF rule, so the
// images equal genforge.runtime.load(BUNDLE, backend="torchscript").sample(n, seed=seed, start=start). The
// result also holds each image's log-probability from the forward graph.
#include <torch/script.h>

#include <nlohmann/json.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

using json = nlohmann::json;

// ---- randomness (docs/bundle.md, "Randomness") --------------------------------------------------------------
static std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c[0], p1 = uint64_t{0xCD9E8D57u} * c[2];
    c = {uint32_t(p1 >> 32) ^ c[1] ^ k[0], uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k[1], uint32_t(p0)};
    k[0] += 0x9E3779B9u;
    k[1] += 0xBB67AE85u;
  }
  return c;
}

static double unit(uint32_t hi, uint32_t lo) { return ((uint64_t{hi} << 21) | (lo >> 11)) * 0x1p-53; }

static std::vector<double> uniforms(uint64_t seed, uint64_t image, size_t count, uint32_t stream = 0) {
  std::vector<double> out(count);
  const std::array<uint32_t, 2> key{uint32_t(seed), uint32_t(seed >> 32)};
  for (size_t b = 0; 2 * b < count; ++b) {
    const auto w = philox4x32({uint32_t(b), uint32_t(image), uint32_t(image >> 32), stream}, key);
    out[2 * b] = unit(w[0], w[1]);
    if (2 * b + 1 < count) out[2 * b + 1] = unit(w[2], w[3]);
  }
  return out;
}

// ---- the sampling rule (docs/bundle.md, "Sampling rule") ---------------------------------------------------
static int64_t inverse_cdf(const float* log_probs, int64_t K, double u) {
  double max = -INFINITY;
  for (int64_t l = 0; l < K; ++l) max = std::max(max, double(log_probs[l]));
  std::vector<double> cdf(K);
  double acc = 0;
  for (int64_t l = 0; l < K; ++l) cdf[l] = acc += std::exp(double(log_probs[l]) - max);
  const double target = u * cdf[K - 1];
  int64_t level = 0;
  for (int64_t l = 0; l + 1 < K; ++l) level += cdf[l] <= target;
  return level;
}

// ---- the bundle ----------------------------------------------------------------------------------------------
struct Graph {
  torch::jit::Module module;
  json spec;
  std::string method;  // v8: the archive's method named like the graph; before: forward
};

static Graph load_graph(const std::string& dir, const json& m, const std::string& name) {
  const auto key = name + ".torchscript";
  if (!m["graphs"].contains(key)) throw std::runtime_error("the bundle has no TorchScript graph " + name);
  const auto& spec = m["graphs"][key];
  const std::string method = m["version"] >= 8 ? spec["method"].get<std::string>() : "forward";
  return {torch::jit::load(dir + "/" + spec["file"].get<std::string>()), spec, method};
}

// Version 7: the weights' safetensors metadata keeps the manifest's bound fields as exported (docs/bundle.md,
// "Bound fields"); a manifest that contradicts them was edited.
static void check_binding(const std::string& dir, const json& m) {
  if (m["version"].get<int>() < 7) return;
  std::ifstream f(dir + "/" + m["weights"].get<std::string>(), std::ios::binary);
  unsigned char len[8] = {};
  f.read(reinterpret_cast<char*>(len), 8);
  uint64_t size = 0;
  for (int i = 7; i >= 0; --i) size = size << 8 | len[i];  // little-endian
  if (!f || size > (100u << 20)) throw std::runtime_error(dir + ": the weights are not a safetensors file");
  std::string header(size, '\0');
  f.read(header.data(), std::streamsize(size));
  const json meta = json::parse(header).value("__metadata__", json::object());
  if (!meta.contains("genforge.manifest")) throw std::runtime_error(dir + ": the weights lack the bound fields");
  const json bound = json::parse(meta["genforge.manifest"].get<std::string>());
  for (const char* k : {"family", "model", "model_config", "image", "levels", "num_classes", "likelihood",
                        "latent_size", "prior", "caches"}) {
    const json have = m.contains(k) ? m[k] : json(), want = bound.contains(k) ? bound[k] : json();
    if (have != want)
      throw std::runtime_error(dir + ": manifest field " + k + " contradicts the weights (the manifest was edited)");
  }
}

int main(int argc, char** argv) try {
  if (argc < 2) throw std::runtime_error("usage: sample BUNDLE [--n N] [--seed S] [--start I] [--out FILE]");
  const std::string dir = argv[1];
  std::map<std::string, std::string> opt{{"n", "4"}, {"seed", "0"}, {"start", "0"}, {"out", ""}};
  for (int a = 2; a + 1 < argc; a += 2) opt[std::string(argv[a]).substr(2)] = argv[a + 1];
  const int64_t n = std::stoll(opt["n"]);
  const uint64_t seed = std::stoull(opt["seed"]), start = std::stoull(opt["start"]);

  json m = json::parse(std::ifstream(dir + "/manifest.json"));
  if (m["format"] != "genforge-bundle") throw std::runtime_error(dir + ": not a genforge bundle");
  if (!m["version"].is_number_integer() || m["version"] < 4 || m["version"] > 8)
    throw std::runtime_error("bundle format version " + m["version"].dump() + "; this reads 4 to 8");
  if (m["randomness"]["name"] != "philox4x32-10" || m["randomness"]["version"] != 1)
    throw std::runtime_error("unknown randomness scheme " + m["randomness"].dump());
  if (m["family"] != "autoregressive") throw std::runtime_error("this client samples autoregressive bundles");
  check_binding(dir, m);
  const int64_t H = m["image"]["height"], W = m["image"]["width"], C = m["image"]["channels"], K = m["levels"];
  const int64_t classes = m.value("num_classes", 0);
  torch::NoGradGuard no_grad;

  std::vector<double> u;  // (n, H, W, C)
  for (int64_t b = 0; b < n; ++b) {
    const auto v = uniforms(seed, start + b, size_t(H * W * C));
    u.insert(u.end(), v.begin(), v.end());
  }
  torch::Tensor labels;
  if (classes) labels = (torch::arange(int64_t(start), int64_t(start) + n, torch::kInt64) % classes);

  std::map<std::string, torch::Tensor> caches;  // cache name -> tensor, zeros at the start
  for (const auto& c : m["caches"]) {
    std::vector<int64_t> shape;
    for (const auto& d : c["shape"]) shape.push_back(d.is_string() ? n : d.get<int64_t>());
    caches[c["name"]] = torch::zeros(shape);
  }
  // Call a cached graph with its inputs in the manifest's order; keep the caches it writes. (The TorchScript
  // step writes some caches in place, "mutates_inputs": fine, as each call's outputs replace them.)
  auto call = [&](Graph& g, const std::map<std::string, torch::Tensor>& given) {
    std::map<std::string, std::string> cache_of;
    for (const auto& s : g.spec["state"])
      if (!s["input"].is_null()) cache_of[s["input"]] = s["cache"];
    std::vector<torch::IValue> args;
    for (const auto& in : g.spec["inputs"]) {
      const std::string name = in["name"];
      args.push_back(name == "labels" ? labels : cache_of.count(name) ? caches[cache_of[name]] : given.at(name));
    }
    const auto outs = g.module.get_method(g.method)(args).toTuple()->elements();
    std::map<std::string, torch::Tensor> named;
    for (size_t i = 0; i < outs.size(); ++i) named[g.spec["outputs"][i]["name"]] = outs[i].toTensor();
    for (const auto& s : g.spec["state"]) caches[s["cache"]] = named[s["output"]];
    return named;
  };

  auto row = load_graph(dir, m, "row"), step = load_graph(dir, m, "step"), forward = load_graph(dir, m, "forward");
  auto x = torch::zeros({n, C, H, W});  // levels
  for (int64_t i = 0; i < H; ++i) {
    auto prev = i ? x.select(2, i - 1).contiguous() : torch::zeros({n, C, W});
    call(row, {{"x_prev_row", prev}, {"has_prev", torch::full({1}, i ? 1.0f : 0.0f)}});
    for (int64_t j = 0; j < W; ++j)
      for (int64_t k = 0; k < C; ++k) {
        auto out = call(step, {{"x_row", x.select(2, i).contiguous()}, {"j", torch::full({1}, j, torch::kInt64)}});
        const auto lp = out["log_probs"].contiguous();  // (n, C, K)
        for (int64_t b = 0; b < n; ++b)
          x[b][k][i][j] = float(inverse_cdf(lp.data_ptr<float>() + (b * C + k) * K, K, u[((b * H + i) * W + j) * C + k]));
      }
  }
  // log p(image) from the forward graph: the sum over sub-pixels of log_probs at the image's levels.
  std::vector<torch::IValue> fargs{x};
  if (classes) fargs.push_back(labels);
  auto lp = forward.module.get_method(forward.method)(fargs).toTensor();  // (n, C, H, W, K)
  auto picked = lp.gather(4, x.to(torch::kInt64).unsqueeze(4)).squeeze(4).to(torch::kFloat64).reshape({n, -1});
  const auto images = x.permute({0, 2, 3, 1}).to(torch::kUInt8).contiguous();  // (n, H, W, C)

  json result{{"shape", {n, H, W, C}},
              {"images", std::vector<uint8_t>(images.data_ptr<uint8_t>(), images.data_ptr<uint8_t>() + images.numel())}};
  std::vector<double> log_prob;
  for (int64_t b = 0; b < n; ++b) {
    double s = 0;  // in order, as the Python runtime sums
    for (int64_t p = 0; p < C * H * W; ++p) s += picked[b][p].item<double>();
    log_prob.push_back(s);
  }
  result["log_prob"] = log_prob;
  if (opt["out"].empty()) std::cout << result.dump() << "\n";
  else std::ofstream(opt["out"]) << result.dump();
  return 0;
} catch (const std::exception& e) {
  std::string what = e.what();
  std::cerr << "error: " << what.substr(0, what.find('\n')) << "\n";
  return 1;
}
