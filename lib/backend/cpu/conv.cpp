// Grouped 2-D convolution (stride 1, odd kernel, zero "same" padding) through oneDNN primitives, cached per
// shape: forward, forward with accumulation (sum post-op), forward scaled and with an addend (eltwise-linear
// and binary-add post-ops, one primitive per (alpha, addend) pair), backward-data, backward-weights, and the
// reorders between plain NCHW / [g, o, i, k, k] and the layouts the primitives run in.
//
// Activations NCHW <-> nChw16c (nChw8c) are converted here with OpenMP loops rather than oneDNN's reorder:
// at 2x2 and 4x4 planes oneDNN 2.6's reorder is several times slower than a copy (one plane of 16 channels is
// a 16 x HW transpose that stays in L1).
#include <omp.h>

#include <algorithm>
#include <string>
#include <unordered_map>
#include <utility>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

using dnnl::memory;
using tag = memory::format_tag;

namespace {

template <typename F>
auto dnnl_checked(const char* what, const ConvShape& shape, F&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    throw BackendError(detail::concat("oneDNN ", what, " failed for convolution ", shape.str(), ": ", e.what()));
  }
}

// Below this many floats a pass runs on one thread: the work is shorter than waking the OpenMP team (and on a
// busy machine a descheduled team member can cost a whole scheduler tick).
constexpr int64_t kParallelFloats = int64_t{1} << 18;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define ORTHOCONV_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ORTHOCONV_SIMD_CLONES
#endif

// One channel block: `valid` planes of `plane` floats (NCHW) -> plane x block floats, zeros past `valid`.
// Tiled over the plane so that the strided side of the transpose stays in L1; scalar on purpose (the
// vectorizer's scatters / gathers are slower than plain moves here).
constexpr int64_t kPlaneTile = 64;

__attribute__((optimize("no-tree-vectorize")))
void block_planes(const float* src, int64_t valid, int64_t plane, int64_t block, float* dst) {
  for (int64_t p0 = 0; p0 < plane; p0 += kPlaneTile) {
    const int64_t p1 = std::min(plane, p0 + kPlaneTile);
    for (int64_t l = 0; l < valid; ++l) {
      const float* s = src + l * plane;
      for (int64_t p = p0; p < p1; ++p) dst[p * block + l] = s[p];
    }
    for (int64_t l = valid; l < block; ++l)
      for (int64_t p = p0; p < p1; ++p) dst[p * block + l] = 0.0f;
  }
}

__attribute__((optimize("no-tree-vectorize")))
void unblock_planes(const float* src, int64_t valid, int64_t plane, int64_t block, float* dst) {
  for (int64_t p0 = 0; p0 < plane; p0 += kPlaneTile) {
    const int64_t p1 = std::min(plane, p0 + kPlaneTile);
    for (int64_t l = 0; l < valid; ++l) {
      float* d = dst + l * plane;
      for (int64_t p = p0; p < p1; ++p) d[p] = src[p * block + l];
    }
  }
}

}  // namespace

struct CpuBackend::ConvPrimitives {
  memory::desc act;               // activations in the conv layout
  memory::desc plain_act;         // NCHW
  memory::desc plain_weights;     // [g, o, i, k, k] or [o, i, k, k]
  dnnl::convolution_forward::primitive_desc fwd_pd, fwd_acc_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, fwd_acc, bwd_data, bwd_weights;
  dnnl::reorder fwd_weights_reorder, bwd_weights_reorder, diff_weights_reorder;
  bool fwd_weights_plain = false, bwd_weights_plain = false, diff_weights_plain = false;
  memory diff_weights_scratch;    // when backward-weights writes a non-plain layout
  std::string impl;
  int64_t block = 16;             // channels per block of the activation layout (all channels: nhwc)
  struct Scaled {
    dnnl::primitive primitive;
    int addend_index = -1;        // position of the binary-add post-op, or -1
  };
  std::map<std::pair<float, bool>, Scaled> scaled;  // (alpha, has addend)
};

CpuBackend::CpuBackend() : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {
  auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto avx512 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
  blocked_tag_ = (isa & avx512) == avx512 ? tag::nChw16c : tag::nChw8c;
}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::name() const {
  auto v = dnnl::version();
  return detail::concat("cpu (oneDNN ", v->major, ".", v->minor, ".", v->patch, ", ",
                        blocked_tag_ == tag::nChw16c ? "nChw16c" : "nChw8c", ")");
}

memory::desc CpuBackend::activation_desc(const ConvShape& shape, int64_t channels, memory::format_tag layout) const {
  return memory::desc({shape.batch, channels, shape.height, shape.width}, memory::data_type::f32, layout);
}

memory::desc CpuBackend::plain_weights_desc(const ConvShape& shape) const {
  int64_t k = shape.kernel;
  if (shape.groups == 1)
    return memory::desc({shape.out_channels, shape.in_channels, k, k}, memory::data_type::f32, tag::oihw);
  return memory::desc({shape.groups, shape.out_channels / shape.groups, shape.in_channels / shape.groups, k, k},
                      memory::data_type::f32, tag::goihw);
}

CpuBackend::ConvPrimitives& CpuBackend::primitives(const ConvShape& shape) {
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups};
  auto it = cache_.find(key);
  if (it != cache_.end()) return *it->second;
  shape.validate();
  return *dnnl_checked("primitive creation", shape, [&] {
    auto p = std::make_unique<ConvPrimitives>();
    p->plain_act = memory::desc({shape.batch, shape.in_channels, shape.height, shape.width},
                                memory::data_type::f32, tag::nchw);
    p->plain_weights = plain_weights_desc(shape);
    memory::desc any_weights(p->plain_weights.dims(), memory::data_type::f32, tag::any);
    memory::dims strides{1, 1}, pad{shape.kernel / 2, shape.kernel / 2};
    auto algo = dnnl::algorithm::convolution_direct;

    // The layout: blocked_tag_, unless oneDNN has only its reference kernel there (grouped convolutions whose
    // channels per group are not a multiple of the block, e.g. GS-SOC's 32 channels in 4 groups in nChw16c,
    // run 50x slower): then nChw8c, then nhwc.
    std::vector<tag> layouts{blocked_tag_};
    if (blocked_tag_ != tag::nChw8c) layouts.push_back(tag::nChw8c);
    layouts.push_back(tag::nhwc);
    memory::desc src, dst;
    for (size_t i = 0; i < layouts.size(); ++i) {
      src = activation_desc(shape, shape.in_channels, layouts[i]);
      dst = activation_desc(shape, shape.out_channels, layouts[i]);
      dnnl::convolution_forward::desc fwd(dnnl::prop_kind::forward_training, algo, src, any_weights, dst,
                                          strides, pad, pad);
      p->fwd_pd = dnnl::convolution_forward::primitive_desc(fwd, engine_);
      const std::string impl = p->fwd_pd.impl_info_str();
      p->block = layouts[i] == tag::nChw16c ? 16 : layouts[i] == tag::nChw8c ? 8 : shape.in_channels;
      if (impl.rfind("ref", 0) != 0) break;
    }
    p->act = src;

    dnnl::post_ops sum;
    sum.append_sum(1.0f);
    dnnl::primitive_attr acc_attr;
    acc_attr.set_post_ops(sum);
    dnnl::convolution_forward::desc fwd_fixed(dnnl::prop_kind::forward_training, algo, src,
                                              p->fwd_pd.weights_desc(), dst, strides, pad, pad);
    p->fwd_acc_pd = dnnl::convolution_forward::primitive_desc(fwd_fixed, acc_attr, engine_);

    dnnl::convolution_backward_data::desc bwd(algo, src, any_weights, dst, strides, pad, pad);
    p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(bwd, engine_, p->fwd_pd);
    dnnl::convolution_backward_weights::desc bww(algo, src, any_weights, dst, strides, pad, pad);
    p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(bww, engine_, p->fwd_pd);

    p->fwd = dnnl::convolution_forward(p->fwd_pd);
    p->fwd_acc = dnnl::convolution_forward(p->fwd_acc_pd);
    p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
    p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);

    p->fwd_weights_plain = p->fwd_pd.weights_desc() == p->plain_weights;
    if (!p->fwd_weights_plain)
      p->fwd_weights_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(engine_, p->plain_weights, engine_, p->fwd_pd.weights_desc()));
    p->bwd_weights_plain = p->bwd_data_pd.weights_desc() == p->plain_weights;
    if (!p->bwd_weights_plain)
      p->bwd_weights_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(engine_, p->plain_weights, engine_, p->bwd_data_pd.weights_desc()));
    p->diff_weights_plain = p->bwd_weights_pd.diff_weights_desc() == p->plain_weights;
    if (!p->diff_weights_plain) {
      p->diff_weights_scratch = memory(p->bwd_weights_pd.diff_weights_desc(), engine_);
      p->diff_weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          engine_, p->bwd_weights_pd.diff_weights_desc(), engine_, p->plain_weights));
    }
    p->impl = detail::concat(p->block == 16 ? "nChw16c" : p->block == 8 ? "nChw8c" : "nhwc", ": fwd ",
                             p->fwd_pd.impl_info_str(), ", bwd-data ", p->bwd_data_pd.impl_info_str(),
                             ", bwd-weights ", p->bwd_weights_pd.impl_info_str());
    auto& slot = cache_[key];
    slot = std::move(p);
    return slot.get();
  });
}

std::string CpuBackend::implementation(const ConvShape& shape) { return primitives(shape).impl; }

int64_t CpuBackend::conv_buffer_size(const ConvShape& shape) {
  return static_cast<int64_t>(primitives(shape).act.get_size() / sizeof(float));
}

void CpuBackend::to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) {
  auto& p = primitives(shape);
  const int64_t block = p.block;
  const int64_t c = shape.in_channels, blocks = (c + block - 1) / block, plane = shape.height * shape.width;
#pragma omp parallel for collapse(2) schedule(static) \
    if (shape.batch * blocks * plane * block > kParallelFloats)
  for (int64_t n = 0; n < shape.batch; ++n)
    for (int64_t b = 0; b < blocks; ++b)
      block_planes(nchw + (n * c + b * block) * plane, std::min(block, c - b * block), plane, block,
                   dst + (n * blocks + b) * plane * block);
}

void CpuBackend::from_conv_layout(const ConvShape& shape, const float* src, float* nchw) {
  auto& p = primitives(shape);
  const int64_t block = p.block;
  const int64_t c = shape.out_channels, blocks = (c + block - 1) / block, plane = shape.height * shape.width;
#pragma omp parallel for collapse(2) schedule(static) \
    if (shape.batch * blocks * plane * block > kParallelFloats)
  for (int64_t n = 0; n < shape.batch; ++n)
    for (int64_t b = 0; b < blocks; ++b)
      unblock_planes(src + (n * blocks + b) * plane * block, std::min(block, c - b * block), plane, block,
                     nchw + (n * c + b * block) * plane);
}

int64_t CpuBackend::conv_weights_size(const ConvShape& shape, ConvPass pass) {
  auto& p = primitives(shape);
  auto desc = pass == ConvPass::forward ? p.fwd_pd.weights_desc() : p.bwd_data_pd.weights_desc();
  return static_cast<int64_t>(desc.get_size() / sizeof(float));
}

void CpuBackend::weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) {
  auto& p = primitives(shape);
  bool forward = pass == ConvPass::forward;
  if (forward ? p.fwd_weights_plain : p.bwd_weights_plain) {
    copy(plain, dst, shape.weight_count());
    return;
  }
  dnnl_checked("weights reorder", shape, [&] {
    auto desc = forward ? p.fwd_pd.weights_desc() : p.bwd_data_pd.weights_desc();
    memory in(p.plain_weights, engine_, const_cast<float*>(plain)), out(desc, engine_, dst);
    (forward ? p.fwd_weights_reorder : p.bwd_weights_reorder).execute(stream_, in, out);
    stream_.wait();
  });
}

void CpuBackend::conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                              bool accumulate) {
  auto& p = primitives(shape);
  dnnl_checked("convolution forward", shape, [&] {
    memory s(p.act, engine_, const_cast<float*>(src));
    memory w(p.fwd_pd.weights_desc(), engine_, const_cast<float*>(weights));
    memory d(p.fwd_pd.dst_desc(), engine_, dst);
    (accumulate ? p.fwd_acc : p.fwd).execute(stream_, {{DNNL_ARG_SRC, s}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, d}});
    stream_.wait();
  });
}

void CpuBackend::conv_backward_data(const ConvShape& shape, const float* diff_dst, const float* weights,
                                    float* diff_src) {
  auto& p = primitives(shape);
  dnnl_checked("convolution backward-data", shape, [&] {
    memory dd(p.bwd_data_pd.diff_dst_desc(), engine_, const_cast<float*>(diff_dst));
    memory w(p.bwd_data_pd.weights_desc(), engine_, const_cast<float*>(weights));
    memory ds(p.bwd_data_pd.diff_src_desc(), engine_, diff_src);
    p.bwd_data.execute(stream_, {{DNNL_ARG_DIFF_DST, dd}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DIFF_SRC, ds}});
    stream_.wait();
  });
}

void CpuBackend::conv_backward_weights(const ConvShape& shape, const float* src, const float* diff_dst,
                                       float* diff_weights) {
  auto& p = primitives(shape);
  dnnl_checked("convolution backward-weights", shape, [&] {
    memory s(p.bwd_weights_pd.src_desc(), engine_, const_cast<float*>(src));
    memory dd(p.bwd_weights_pd.diff_dst_desc(), engine_, const_cast<float*>(diff_dst));
    memory plain(p.plain_weights, engine_, diff_weights);
    memory dw = p.diff_weights_plain ? plain : p.diff_weights_scratch;
    p.bwd_weights.execute(stream_, {{DNNL_ARG_SRC, s}, {DNNL_ARG_DIFF_DST, dd}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
    if (!p.diff_weights_plain) p.diff_weights_reorder.execute(stream_, p.diff_weights_scratch, plain);
    stream_.wait();
  });
}

void CpuBackend::conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                     const float* addend, float* dst) {
  auto& p = primitives(shape);
  auto key = std::make_pair(alpha, addend != nullptr);
  auto it = p.scaled.find(key);
  if (it == p.scaled.end()) {
    it = dnnl_checked("scaled forward primitive creation", shape, [&] {
      memory::dims strides{1, 1}, pad{shape.kernel / 2, shape.kernel / 2};
      dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                           p.act, p.fwd_pd.weights_desc(), p.act, strides, pad, pad);
      dnnl::post_ops ops;
      ConvPrimitives::Scaled entry;
      if (alpha != 1.0f) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_linear, alpha, 0.0f);
      if (addend) {
        entry.addend_index = ops.len();
        ops.append_binary(dnnl::algorithm::binary_add, p.act);
      }
      dnnl::primitive_attr attr;
      attr.set_post_ops(ops);
      dnnl::convolution_forward::primitive_desc pd(desc, attr, engine_);
      entry.primitive = dnnl::convolution_forward(pd);
      if (p.scaled.empty()) p.impl += detail::concat(", fwd-scaled ", pd.impl_info_str());
      return p.scaled.emplace(key, std::move(entry)).first;
    });
  }
  dnnl_checked("scaled convolution forward", shape, [&] {
    memory s(p.act, engine_, const_cast<float*>(src));
    memory w(p.fwd_pd.weights_desc(), engine_, const_cast<float*>(weights));
    memory d(p.act, engine_, dst);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, s}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, d}};
    if (addend)
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(it->second.addend_index) | DNNL_ARG_SRC_1,
                   memory(p.act, engine_, const_cast<float*>(addend)));
    it->second.primitive.execute(stream_, args);
    stream_.wait();
  });
}

}  // namespace orthoconv::cpu
