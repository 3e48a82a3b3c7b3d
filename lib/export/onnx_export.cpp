// The ONNX writer: a LipConvnet in evaluation mode as a graph of standard operators (see
// include/orthoconv/onnx_export.hpp for what each step becomes and why). Only this file sees ONNX and protobuf
// (ORTHOCONV_WITH_ONNX, lib/CMakeLists.txt); the metadata is computed without them.
#include "orthoconv/onnx_export.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "orthoconv/checkpoint.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/model_state.hpp"

#ifdef ORTHOCONV_WITH_ONNX
#include <Eigen/Dense>
#include <onnx/checker.h>
#include <onnx/onnx_pb.h>
#endif

namespace orthoconv {

namespace {

std::string number(double value) {
  char text[64];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

int checked_terms(LipConvnet& model, int terms) {
  if (terms == 0) terms = model.config().eval_terms;
  require(terms > 0 && terms <= kMaxSeriesTerms, "ONNX export: series terms must be in 1..", kMaxSeriesTerms, ", got ",
          terms);
  return terms;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> onnx_metadata(LipConvnet& model, const Normalization& norm,
                                                               const NetworkBound& bound) {
  require(bound.precision == Precision::float32, "onnx_metadata: the bound must be the float32 one, got ",
          precision_name(bound.precision));
  const ModelConfig& config = model.config();
  // The per-logit bound of the lln head folds the head's own rounding into the same affine form (logit_error_bound).
  const double per_norm =
      bound.error_per_input_norm + (bound.lln ? bound.lln_row_error * bound.activation_per_input_norm : 0.0);
  const double constant = bound.error_constant + (bound.lln ? bound.lln_row_error * bound.activation_constant : 0.0);
  const std::string side = std::to_string(config.input_side);
  std::string radius;
  if (!bound.lln) {
    radius =
        "For an image x (pixels in [0, 1]) with computed logits f and c = argmax f, every x' with ||x' - x||_2 < r "
        "is classified c, where r = (f_c - max_{j != c} f_j - sqrt(2) E) / (sqrt(2) L L_in), L = "
        "orthoconv.lipschitz, L_in = orthoconv.lipschitz_input, and E = a ||(x - mean) / std||_2 + b "
        "(a = orthoconv.rounding_float32_per_input_norm, b = orthoconv.rounding_float32_constant) bounds the l2 "
        "distance of the float32 logits from the exact ones (network_bound.hpp: every Conv / MatMul output a "
        "float32 dot product in any order, with or without FMA, then the graph's Add nodes). With exact "
        "logits (E = 0): r = margin / (sqrt(2) L L_in). orthoconv certify reaches E ~ 1e-8 with a float64 pass.";
  } else {
    radius =
        "For an image x (pixels in [0, 1]) with computed logits f and c = argmax f, every x' with ||x' - x||_2 < r "
        "is classified c, where r = min_{j != c} (f_c - f_j - 2 E - 2^-24 (|f_c| + |f_j|)) / (||q_c - q_j|| L "
        "L_in), q the unit rows of the head's weight (initializer head.rows, transposed: [features, classes]; "
        "add 2^-23 to each ||q_c - q_j|| computed from the float32 rows), L = orthoconv.lipschitz (the body's), "
        "L_in = orthoconv.lipschitz_input, and E = a ||(x - mean) / std||_2 + b (a = "
        "orthoconv.rounding_float32_per_input_norm, b = orthoconv.rounding_float32_constant) bounds each "
        "logit's float32 rounding (network_bound.hpp). With exact logits (E = 0) the 2 E and 2^-24 terms drop.";
  }
  return {{"orthoconv.architecture", config.architecture()},
          {"orthoconv.series_terms", std::to_string(bound.terms)},
          {"orthoconv.lipschitz", number(bound.lipschitz)},
          {"orthoconv.lipschitz_input", number(norm.lipschitz())},
          {"orthoconv.head", head_name(config.head)},
          {"orthoconv.normalization.mean", format_floats(norm.mean.data(), 3)},
          {"orthoconv.normalization.std", format_floats(norm.std.data(), 3)},
          {"orthoconv.rounding_float32_per_input_norm", number(per_norm)},
          {"orthoconv.rounding_float32_constant", number(constant)},
          {"orthoconv.input", std::string(kOnnxInputName) + " [N, 3, " + side + ", " + side +
                                  "] float32 in [0, 1]: R, G, B planes, x = byte / 255; output " + kOnnxOutputName +
                                  " [N, " + std::to_string(config.classes) + "]"},
          {"orthoconv.certified_radius", radius}};
}

#ifndef ORTHOCONV_WITH_ONNX

bool onnx_export_available() { return false; }

OnnxExportSummary export_onnx(LipConvnet& model, const Normalization&, const std::string&, int terms) {
  checked_terms(model, terms);
  throw Error(
      "this orthoconv was built without ONNX export: install libonnx-dev and libprotobuf-dev "
      "(scripts/install-deps.sh) and configure again (-DORTHOCONV_ONNX=AUTO or ON)");
}

#else

bool onnx_export_available() { return true; }

namespace {

// protobuf cannot serialize a message of 2 GiB or more.
constexpr int64_t kProtobufLimit = (int64_t{1} << 31) - (int64_t{1} << 20);

// An activation in the graph: its value name and shape (rank 4 [N, channels, side, side], or 2 after Flatten).
struct Activation {
  std::string name;
  int64_t channels = 0;
  int64_t side = 0;
  int rank = 4;
};

// Appends nodes and initializers to one GraphProto, with unique value names derived from the step names.
class GraphWriter {
 public:
  explicit GraphWriter(onnx::GraphProto& graph) : graph_(graph) {}

  std::string unique(const std::string& hint) {
    int& count = used_[hint];
    return ++count == 1 ? hint : hint + "_" + std::to_string(count);
  }

  std::string floats(const std::string& hint, const std::vector<int64_t>& dims, const std::vector<float>& values) {
    int64_t size = 1;
    for (int64_t d : dims) size *= d;
    require<Error>(size == static_cast<int64_t>(values.size()), "ONNX export: initializer ", hint, " has ",
                   values.size(), " values for ", size);
    onnx::TensorProto& t = *graph_.add_initializer();
    t.set_name(unique(hint));
    t.set_data_type(onnx::TensorProto::FLOAT);
    for (int64_t d : dims) t.add_dims(d);
    // raw_data is little-endian, as this machine's floats (x86-64, aarch64).
    t.set_raw_data(std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float)));
    weights_ += size;
    return t.name();
  }

  std::string ints(const std::string& hint, const std::vector<int64_t>& values) {
    onnx::TensorProto& t = *graph_.add_initializer();
    t.set_name(unique(hint));
    t.set_data_type(onnx::TensorProto::INT64);
    t.add_dims(static_cast<int64_t>(values.size()));
    for (int64_t v : values) t.add_int64_data(v);
    return t.name();
  }

  // One node with one output named after `hint`; returns the node (for attributes).
  onnx::NodeProto& node(const std::string& op, const std::vector<std::string>& inputs, const std::string& hint,
                        int outputs = 1) {
    onnx::NodeProto& n = *graph_.add_node();
    n.set_op_type(op);
    const std::string name = unique(hint);
    n.set_name(name);
    for (const std::string& i : inputs) n.add_input(i);
    if (outputs == 1) {
      n.add_output(name);
    } else {
      for (int i = 0; i < outputs; ++i) n.add_output(name + ":" + std::to_string(i));
    }
    return n;
  }
  std::string op(const std::string& type, const std::vector<std::string>& inputs, const std::string& hint) {
    return node(type, inputs, hint).output(0);
  }

  int64_t weights() const { return weights_; }

 private:
  onnx::GraphProto& graph_;
  std::map<std::string, int> used_;
  int64_t weights_ = 0;
};

void set_int(onnx::NodeProto& node, const std::string& name, int64_t value) {
  onnx::AttributeProto& a = *node.add_attribute();
  a.set_name(name);
  a.set_type(onnx::AttributeProto::INT);
  a.set_i(value);
}

void set_ints(onnx::NodeProto& node, const std::string& name, const std::vector<int64_t>& values) {
  onnx::AttributeProto& a = *node.add_attribute();
  a.set_name(name);
  a.set_type(onnx::AttributeProto::INTS);
  for (int64_t v : values) a.add_ints(v);
}

// Channel t of SpaceToDepth(s) on c channels, (p s + q) c + ch, is orthoconv's pixel-unshuffle channel
// (ch s + p) s + q: the orthoconv channel of each SpaceToDepth channel.
std::vector<int64_t> unshuffle_channels(int64_t channels, int64_t stride) {
  std::vector<int64_t> out(static_cast<size_t>(channels * stride * stride));
  for (int64_t p = 0; p < stride; ++p)
    for (int64_t q = 0; q < stride; ++q)
      for (int64_t ch = 0; ch < channels; ++ch)
        out[static_cast<size_t>((p * stride + q) * channels + ch)] = (ch * stride + p) * stride + q;
  return out;
}

// The inverse permutation: for each orthoconv channel, the SpaceToDepth channel holding it (a Gather's indices).
std::vector<int64_t> unshuffle_gather(int64_t channels, int64_t stride) {
  const std::vector<int64_t> order = unshuffle_channels(channels, stride);
  std::vector<int64_t> out(order.size());
  for (size_t t = 0; t < order.size(); ++t) out[static_cast<size_t>(order[t])] = static_cast<int64_t>(t);
  return out;
}

// The series channel (of C g) each output channel of a SocConv keeps (soc_conv.hpp: the first c_out, or the first
// c_out / g of each group).
std::vector<int64_t> kept_channels(const SocConfig& config) {
  const int64_t c = config.group_channels(), per_group = config.out_channels / config.groups;
  std::vector<int64_t> out(static_cast<size_t>(config.out_channels));
  for (int64_t o = 0; o < config.out_channels; ++o)
    out[static_cast<size_t>(o)] = config.keep == KeepChannels::per_group ? (o / per_group) * c + o % per_group : o;
  return out;
}

std::string add_bias(GraphWriter& w, SocConv& soc, const std::string& name, const std::string& x, int rank) {
  if (!soc.config().bias) return x;
  const std::vector<float> bias = soc.bias().value.to_vector();
  const int64_t c = static_cast<int64_t>(bias.size());
  const std::vector<int64_t> dims = rank == 4 ? std::vector<int64_t>{1, c, 1, 1} : std::vector<int64_t>{1, c};
  return w.op("Add", {x, w.floats(name + ".bias", dims, bias)}, name + "/bias");
}

// P = sum_{i<=K} A^i / i! for each group, by Horner's rule (T = I + A T / j, j = K..1) in double from the float32
// A_n: [g][C x C], row-major.
std::vector<Eigen::MatrixXd> matrix_polynomial(const std::vector<float>& filter, int64_t groups, int64_t c, int terms) {
  std::vector<Eigen::MatrixXd> out;
  for (int64_t g = 0; g < groups; ++g) {
    Eigen::MatrixXd a(c, c);
    for (int64_t o = 0; o < c; ++o)
      for (int64_t i = 0; i < c; ++i) a(o, i) = static_cast<double>(filter[static_cast<size_t>((g * c + o) * c + i)]);
    Eigen::MatrixXd t = Eigen::MatrixXd::Identity(c, c);
    for (int j = terms; j >= 1; --j) {
      Eigen::MatrixXd next = a * t / static_cast<double>(j);
      next.diagonal().array() += 1.0;
      t = std::move(next);
    }
    out.push_back(std::move(t));
  }
  return out;
}

// A 1x1 SocConv as one Conv (4-D input) or MatMul (2-D, the head after Flatten) by its matrix polynomial.
Activation add_soc_matrix(GraphWriter& w, SocConv& soc, const std::string& name, const Activation& x, int terms) {
  const SocConfig& config = soc.config();
  const int64_t s = config.stride, c = config.group_channels(), g = config.groups;
  const int64_t width = c * g, unshuffled = config.unshuffled_channels(), out = config.out_channels;
  const std::vector<Eigen::MatrixXd> p = matrix_polynomial(soc.scaled_filter().to_vector(), g, c, terms);
  const std::vector<int64_t> kept = kept_channels(config);
  bool identity_keep = out == width;
  for (int64_t o = 0; o < out && identity_keep; ++o) identity_keep = kept[static_cast<size_t>(o)] == o;
  Activation y{"", out, x.side / s, x.rank};
  std::string input = x.name;
  if (x.rank == 4 && s > 1) {
    onnx::NodeProto& node = w.node("SpaceToDepth", {input}, name + "/unshuffle");
    set_int(node, "blocksize", s);
    input = node.output(0);
  }
  if (x.rank == 4 && s == 1 && unshuffled == width && identity_keep && g > 1) {
    // Nothing to fold: a grouped Conv by the blocks of P, [g C, C, 1, 1].
    std::vector<float> weight(static_cast<size_t>(width * c));
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t o = 0; o < c; ++o)
        for (int64_t i = 0; i < c; ++i)
          weight[static_cast<size_t>((gi * c + o) * c + i)] = static_cast<float>(p[static_cast<size_t>(gi)](o, i));
    onnx::NodeProto& node = w.node("Conv", {input, w.floats(name + ".matrix", {width, c, 1, 1}, weight)}, name);
    set_int(node, "group", g);
    set_ints(node, "kernel_shape", {1, 1});
    y.name = add_bias(w, soc, name, node.output(0), 4);
    return y;
  }
  // The dense out x unshuffled matrix: row o is series row kept[o] of the block-diagonal P; column t reads the
  // series channel of input channel t (its unshuffle position; the zero channels beyond `unshuffled` drop out).
  const std::vector<int64_t> series_channel =
      s > 1 ? unshuffle_channels(config.in_channels, s) : std::vector<int64_t>();
  std::vector<float> dense(static_cast<size_t>(out * unshuffled), 0.0f);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t row = kept[static_cast<size_t>(o)], group = row / c;
    for (int64_t t = 0; t < unshuffled; ++t) {
      const int64_t m = s > 1 ? series_channel[static_cast<size_t>(t)] : t;
      if (m / c == group)
        dense[static_cast<size_t>(o * unshuffled + t)] =
            static_cast<float>(p[static_cast<size_t>(group)](row % c, m % c));
    }
  }
  if (x.rank == 2) {  // the head: logits = features Q^T + bias (Q^T stored [unshuffled, out])
    std::vector<float> transposed(dense.size());
    for (int64_t o = 0; o < out; ++o)
      for (int64_t t = 0; t < unshuffled; ++t)
        transposed[static_cast<size_t>(t * out + o)] = dense[static_cast<size_t>(o * unshuffled + t)];
    const std::string product =
        w.op("MatMul", {input, w.floats(name + ".matrix", {unshuffled, out}, transposed)}, name);
    y.name = add_bias(w, soc, name, product, 2);
    return y;
  }
  onnx::NodeProto& node = w.node("Conv", {input, w.floats(name + ".matrix", {out, unshuffled, 1, 1}, dense)}, name);
  set_ints(node, "kernel_shape", {1, 1});
  y.name = add_bias(w, soc, name, node.output(0), 4);
  return y;
}

// A SocConv with k > 1: unshuffle, zero channels, the Horner series of Conv and Add nodes, kept channels, bias.
Activation add_soc(GraphWriter& w, SocConv& soc, const std::string& name, const Activation& x, int terms) {
  const SocConfig& config = soc.config();
  require<Error>(x.channels == config.in_channels && x.side % config.stride == 0, "ONNX export: ", name, " expects ",
                 config.in_channels, " channels at a side divisible by ", config.stride, ", the graph has ", x.channels,
                 " at ", x.side);
  if (config.kernel == 1) return add_soc_matrix(w, soc, name, x, terms);
  require<Error>(x.rank == 4, "ONNX export: ", name, " (", config.kernel, "x", config.kernel, ") after Flatten");
  const int64_t s = config.stride, c = config.group_channels(), g = config.groups, k = config.kernel;
  const int64_t width = c * g, unshuffled = config.unshuffled_channels();
  std::string x0 = x.name;
  if (s > 1) {
    onnx::NodeProto& node = w.node("SpaceToDepth", {x0}, name + "/unshuffle");
    set_int(node, "blocksize", s);
    onnx::NodeProto& order =
        w.node("Gather", {node.output(0), w.ints(name + ".unshuffle_order", unshuffle_gather(config.in_channels, s))},
               name + "/unshuffle_order");
    set_int(order, "axis", 1);
    x0 = order.output(0);
  }
  if (width > unshuffled)
    x0 = w.op("Pad", {x0, w.ints(name + ".zero_channels", {0, 0, 0, 0, 0, width - unshuffled, 0, 0})},
              name + "/zero_channels");
  const std::vector<float> filter = soc.scaled_filter().to_vector();  // [g, C, C, k, k] = ONNX's [g C, C, k, k]
  std::string p = x0;
  for (int j = terms; j >= 1; --j) {
    // W_j = fl(1/j) A_n: the float32 layer's scaled copies (soc_conv.cpp), the same rounding.
    const float scale = 1.0f / static_cast<float>(j);
    std::vector<float> weight(filter.size());
    for (size_t i = 0; i < filter.size(); ++i) weight[i] = scale * filter[i];
    const std::string term = name + "/term" + std::to_string(j);
    onnx::NodeProto& conv =
        w.node("Conv", {p, w.floats(name + ".series" + std::to_string(j), {width, c, k, k}, weight)}, term + "/conv");
    set_int(conv, "group", g);
    set_ints(conv, "kernel_shape", {k, k});
    set_ints(conv, "pads", {k / 2, k / 2, k / 2, k / 2});
    p = w.op("Add", {x0, conv.output(0)}, term);
  }
  const std::vector<int64_t> kept = kept_channels(config);
  if (config.keep == KeepChannels::per_group && config.out_channels < width) {
    onnx::NodeProto& node = w.node("Gather", {p, w.ints(name + ".kept_channels", kept)}, name + "/keep");
    set_int(node, "axis", 1);
    p = node.output(0);
  } else if (config.out_channels < width) {
    p = w.op("Slice",
             {p, w.ints(name + ".keep_start", {0}), w.ints(name + ".keep_end", {config.out_channels}),
              w.ints(name + ".keep_axis", {1})},
             name + "/keep");
  }
  return {add_bias(w, soc, name, p, 4), config.out_channels, x.side / s, 4};
}

Activation add_shuffle(GraphWriter& w, const std::vector<int32_t>& destination, const std::string& name,
                       const Activation& x) {
  require<Error>(static_cast<int64_t>(destination.size()) == x.channels, "ONNX export: ", name, " permutes ",
                 destination.size(), " channels, the graph has ", x.channels);
  std::vector<int64_t> source(destination.size());  // output channel d reads input channel source[d]
  for (size_t i = 0; i < destination.size(); ++i) source[static_cast<size_t>(destination[i])] = static_cast<int64_t>(i);
  onnx::NodeProto& node = w.node("Gather", {x.name, w.ints(name + ".source", source)}, name);
  set_int(node, "axis", 1);
  Activation y = x;
  y.name = node.output(0);
  return y;
}

Activation add_maxmin(GraphWriter& w, bool paired, const std::string& name, const Activation& x) {
  require<Error>(x.rank == 4 && x.channels % 2 == 0, "ONNX export: ", name, " needs an even channel count, got ",
                 x.channels);
  std::string input = x.name;
  const int64_t axis = paired ? 2 : 1;
  if (paired)  // channel pairs (2i, 2i + 1) -> [N, C/2, 2, H, W]
    input = w.op("Reshape", {input, w.ints(name + ".pairs", {0, x.channels / 2, 2, x.side, x.side})}, name + "/pairs");
  onnx::NodeProto& split = w.node("Split", {input}, name + "/split", 2);
  set_int(split, "axis", axis);
  const std::string low = w.op("Min", {split.output(0), split.output(1)}, name + "/min");
  const std::string high = w.op("Max", {split.output(0), split.output(1)}, name + "/max");
  onnx::NodeProto& concat = w.node("Concat", {low, high}, paired ? name + "/concat" : name);
  set_int(concat, "axis", axis);
  Activation y = x;
  y.name = concat.output(0);
  if (paired) y.name = w.op("Reshape", {y.name, w.ints(name + ".channels", {0, x.channels, x.side, x.side})}, name);
  return y;
}

Activation add_flatten(GraphWriter& w, const Activation& x) {
  onnx::NodeProto& node = w.node("Flatten", {x.name}, "flatten");
  set_int(node, "axis", 1);
  return {node.output(0), x.channels * x.side * x.side, 1, 2};
}

Activation add_lln(GraphWriter& w, LinearNormalized& head, const Activation& x) {
  require<Error>(x.rank == 2, "ONNX export: the lln head before Flatten");
  const int64_t features = x.channels;
  const std::vector<double> rows = head.normalized_rows();  // [classes, F], w_i / ||w_i|| in double
  require<Error>(features > 0 && rows.size() % static_cast<size_t>(features) == 0, "ONNX export: the lln head has ",
                 rows.size(), " weights for ", features, " features");
  const int64_t classes = static_cast<int64_t>(rows.size()) / features;
  std::vector<float> transposed(rows.size());
  for (int64_t i = 0; i < classes; ++i)
    for (int64_t f = 0; f < features; ++f)
      transposed[static_cast<size_t>(f * classes + i)] =
          static_cast<float>(rows[static_cast<size_t>(i * features + f)]);
  const std::string product = w.op("MatMul", {x.name, w.floats("head.rows", {features, classes}, transposed)}, "head");
  const std::vector<float> bias = head.bias().value.to_vector();
  return {w.op("Add", {product, w.floats("head.bias", {1, classes}, bias)}, "head/bias"), classes, 1, 2};
}

Activation add_normalization(GraphWriter& w, const Normalization& norm, int64_t side) {
  const std::vector<float> mean(norm.mean.begin(), norm.mean.end()), std(norm.std.begin(), norm.std.end());
  const std::string centred =
      w.op("Sub", {kOnnxInputName, w.floats("normalization.mean", {1, 3, 1, 1}, mean)}, "normalization/sub");
  return {w.op("Div", {centred, w.floats("normalization.std", {1, 3, 1, 1}, std)}, "normalization"), 3, side, 4};
}

// The network's steps in order, as the model lists them (LipConvnet::steps(): the one description every pass walks);
// each step's output shape is checked against the graph's.
Activation add_network(GraphWriter& w, LipConvnet& model, const Activation& input, int terms) {
  Activation x = input;
  for (const NetworkStep& step : model.steps()) {
    switch (step.kind) {
      case StepKind::shuffle:  // GS-SOC (a, 1)'s middle shuffle is the identity: skipped, as the forward does
        if (!step.shuffle->is_identity()) x = add_shuffle(w, step.shuffle->destination(), step.name, x);
        break;
      case StepKind::soc:
        x = add_soc(w, *step.soc, step.name, x, terms);
        break;
      case StepKind::maxmin:
        x = add_maxmin(w, step.maxmin->paired(), step.name, x);
        break;
      case StepKind::flatten:
        x = add_flatten(w, x);
        break;
      case StepKind::lln:
        x = add_lln(w, *step.lln, x);
        break;
    }
    const Shape& out = step.output;  // one image, [1, C, H, W]
    const bool same = x.rank == 4 ? out[1] == x.channels && out[2] == x.side && out[3] == x.side
                                  : out[1] * out[2] * out[3] == x.channels;
    require<Error>(same, "ONNX export: step ", step.name, " gives ", out.str(), ", the graph has ", x.channels,
                   " channels at side ", x.side);
  }
  return x;
}

void add_tensor_value(onnx::ValueInfoProto& value, const std::string& name, const std::vector<int64_t>& dims) {
  value.set_name(name);
  onnx::TypeProto::Tensor& tensor = *value.mutable_type()->mutable_tensor_type();
  tensor.set_elem_type(onnx::TensorProto::FLOAT);
  onnx::TensorShapeProto& shape = *tensor.mutable_shape();
  shape.add_dim()->set_dim_param("N");
  for (int64_t d : dims) shape.add_dim()->set_dim_value(d);
}

}  // namespace

OnnxExportSummary export_onnx(LipConvnet& model, const Normalization& norm, const std::string& path, int terms) {
  terms = checked_terms(model, terms);
  check_writable_file(path, "ONNX model");
  const ModelConfig& config = model.config();
  OnnxExportSummary summary;
  summary.terms = terms;
  summary.bound = verify_network(model, terms, Precision::float32, norm);
  summary.metadata = onnx_metadata(model, norm, summary.bound);

  onnx::ModelProto proto;
  proto.set_ir_version(onnx::IR_VERSION);
  proto.set_producer_name("orthoconv");
  proto.set_producer_version(ORTHOCONV_VERSION_TEXT);
  proto.set_model_version(1);
  proto.set_doc_string("orthoconv LipConvnet " + config.architecture() + ", evaluation mode with " +
                       std::to_string(terms) + " series terms. " + summary.metadata.back().second);
  onnx::OperatorSetIdProto& opset = *proto.add_opset_import();
  opset.set_domain("");
  opset.set_version(kOnnxOpset);
  for (const auto& [key, value] : summary.metadata) {
    onnx::StringStringEntryProto& entry = *proto.add_metadata_props();
    entry.set_key(key);
    entry.set_value(value);
  }
  onnx::GraphProto& graph = *proto.mutable_graph();
  graph.set_name("lipconvnet");
  add_tensor_value(*graph.add_input(), kOnnxInputName, {3, config.input_side, config.input_side});
  GraphWriter writer(graph);
  writer.unique(kOnnxInputName);
  const Activation input = add_normalization(writer, norm, config.input_side);
  const Activation logits = add_network(writer, model, input, terms);
  require<Error>(logits.rank == 2 && logits.channels == config.classes, "ONNX export: the graph ends in ",
                 logits.channels, " values, the model has ", config.classes, " classes");
  // The last node's output becomes the graph output "logits".
  graph.mutable_node(graph.node_size() - 1)->set_output(0, kOnnxOutputName);
  add_tensor_value(*graph.add_output(), kOnnxOutputName, {config.classes});
  summary.nodes = graph.node_size();
  summary.weights = writer.weights();

  const int64_t size = static_cast<int64_t>(proto.ByteSizeLong());
  if (size >= kProtobufLimit)
    throw NamingSettings<Error>(
        {"terms"}, detail::concat("ONNX export: the model would take ", size / (1 << 20), " MiB with ", terms,
                                  " series terms (each term a copy of the filters), beyond "
                                  "protobuf's 2 GiB: use fewer {0}"));
  try {
    onnx::checker::check_model(proto);
  } catch (const std::exception& e) {
    throw Error(std::string("ONNX export: ONNX's checker refuses the graph (a bug in the exporter): ") + e.what());
  }
  std::string bytes;
  require<Error>(proto.SerializeToString(&bytes), "ONNX export: protobuf could not serialize the model");
  write_file_atomically(path, bytes);
  summary.bytes = static_cast<int64_t>(bytes.size());
  return summary;
}

#endif

}  // namespace orthoconv
