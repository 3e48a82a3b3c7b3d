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
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>

#include "backend/cpu/cpu_backend.hpp"

namespace orthoconv::cpu {

using dnnl::memory;
using tag = memory::format_tag;

namespace {

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

__attribute__((optimize("no-tree-vectorize"))) void block_planes(const float* src, int64_t valid, int64_t plane,
                                                                 int64_t block, float* dst) {
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

__attribute__((optimize("no-tree-vectorize"))) void unblock_planes(const float* src, int64_t valid, int64_t plane,
                                                                   int64_t block, float* dst) {
  for (int64_t p0 = 0; p0 < plane; p0 += kPlaneTile) {
    const int64_t p1 = std::min(plane, p0 + kPlaneTile);
    for (int64_t l = 0; l < valid; ++l) {
      float* d = dst + l * plane;
      for (int64_t p = p0; p < p1; ++p) d[p] = src[p * block + l];
    }
  }
}

}  // namespace

struct CpuBackend::ScaledPrimitive {
  dnnl::primitive primitive;
  int addend_index = -1;  // position of the binary-add post-op, or -1
};

// The primitives of one input data type at one shape: float32, or bf16 src / diff_dst / weights with float32
// dst, diff_weights and post-op addends (oneDNN's jit_bf16 kernels accumulate in float32).
struct CpuBackend::ConvKernels {
  memory::desc act;  // src and diff_dst in the conv layout, this data type
  dnnl::convolution_forward::primitive_desc fwd_pd, fwd_acc_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, fwd_acc, bwd_weights;
  dnnl::reorder fwd_weights_reorder, diff_weights_reorder;
  bool fwd_weights_plain = false, diff_weights_plain = false;
  memory diff_weights_scratch;  // when backward-weights writes a non-plain layout
  // bf16 kernels of a grouped shape run as ONE dense convolution with block-diagonal weights (bf16_as_dense):
  // weights are expanded from the plain grouped layout into `dense_plain` ([C, C, k, k] float32, zeros off the
  // diagonal blocks) before their reorder, and backward-weights writes the dense gradient there, of which only
  // the diagonal blocks are copied out.
  bool dense = false;
  memory dense_plain;
  std::map<std::tuple<float, bool, bool>, ScaledPrimitive> scaled;  // (alpha, has addend, rounded dst)
  // The forward as a pixel matmul (pixel_matmul_applies), replacing fwd / fwd_acc / scaled and their weights.
  std::unique_ptr<PixelMatmul> pixel;
  std::string impl;
};

struct CpuBackend::ConvPrimitives {
  memory::desc out;            // float32 activations in the conv layout (dst, addends, every buffer)
  memory::desc plain_act;      // NCHW
  memory::desc plain_weights;  // [g, o, i, k, k] or [o, i, k, k]
  tag layout = tag::undef;
  int64_t block = 16;  // channels per block of the activation layout (all channels: nhwc)
  std::unique_ptr<ConvKernels> f32;
  std::unique_ptr<ConvKernels> bf16;  // created at the first bf16 request (null where oneDNN has none)
  // Backward-data: float32 only (the layers' transposed convolutions run on the forward primitive).
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::primitive bwd_data;
  dnnl::reorder bwd_weights_reorder;
  bool bwd_weights_plain = false;
  // Whether the forward / backward-weights pass of a bf16 request runs in bf16, once chosen; and why.
  std::optional<bool> bf16_forward, bf16_backward_weights;
  // A bf16 pass whose first run took more than too_slow_factor_ times float32: never run again at this shape
  // (kept when the precision choice is reset).
  bool bf16_forward_too_slow = false, bf16_backward_weights_too_slow = false;
  std::string impl, bf16_choices;
};

CpuBackend::CpuBackend() : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_) {
  auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto avx512 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core);
  auto avx512_bf16 = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_bf16);
  auto amx = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_amx);
  blocked_tag_ = (isa & avx512) == avx512 ? tag::nChw16c : tag::nChw8c;
  has_bf16_ = (isa & avx512_bf16) == avx512_bf16;
  has_amx_ = (isa & amx) == amx;
}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::name() const {
  auto v = dnnl::version();
  return detail::concat("cpu (oneDNN ", v->major, ".", v->minor, ".", v->patch, ", ",
                        blocked_tag_ == tag::nChw16c ? "nChw16c" : "nChw8c", has_bf16_ ? ", bf16" : "",
                        has_amx_ ? ", AMX" : "", ")");
}

memory::desc CpuBackend::activation_desc(const ConvShape& shape, int64_t channels, memory::format_tag layout) const {
  return memory::desc({shape.batch, channels, shape.height, shape.width}, memory::data_type::f32, layout);
}

memory::desc CpuBackend::dense_weights_desc(const ConvShape& shape) const {
  return memory::desc({shape.out_channels, shape.in_channels, shape.kernel, shape.kernel}, memory::data_type::f32,
                      tag::oihw);
}

memory::desc CpuBackend::plain_weights_desc(const ConvShape& shape) const {
  int64_t k = shape.kernel;
  if (shape.groups == 1)
    return memory::desc({shape.out_channels, shape.in_channels, k, k}, memory::data_type::f32, tag::oihw);
  return memory::desc({shape.groups, shape.out_channels / shape.groups, shape.in_channels / shape.groups, k, k},
                      memory::data_type::f32, tag::goihw);
}

bool CpuBackend::bf16_as_dense(const ConvShape& shape) const {
  return has_amx_ && shape.groups > 1 && shape.groups <= 4 && shape.in_channels / shape.groups < 16;
}

std::unique_ptr<CpuBackend::ConvKernels> CpuBackend::make_kernels(const ConvShape& shape, const ConvPrimitives& p,
                                                                  memory::data_type input_type) {
  auto k = std::make_unique<ConvKernels>();
  k->act = memory::desc(p.out.dims(), input_type, p.layout);
  k->dense = input_type == memory::data_type::bf16 && bf16_as_dense(shape);
  const memory::desc plain = k->dense ? dense_weights_desc(shape) : p.plain_weights;
  if (k->dense) k->dense_plain = memory(plain, engine_);
  memory::desc any_weights(plain.dims(), input_type, tag::any);
  memory::desc any_diff_weights(plain.dims(), memory::data_type::f32, tag::any);
  memory::dims strides{1, 1}, pad{shape.kernel / 2, shape.kernel / 2};
  const auto algo = dnnl::algorithm::convolution_direct;
  const auto prop = dnnl::prop_kind::forward_training;

  // The weights format is the one oneDNN picks for the Horner step (binary-add post-op, x0): every forward variant
  // then gets the same jit kernel. In nhwc oneDNN 2.6 picks brgconv for a plain forward, whose weights format its
  // kernels with a binary post-op do not take: with it the Horner step fell back to ref:any (no step finished).
  dnnl::post_ops add;
  add.append_binary(dnnl::algorithm::binary_add, p.out);
  dnnl::primitive_attr add_attr;
  add_attr.set_post_ops(add);
  const dnnl::convolution_forward::primitive_desc horner_pd(
      dnnl::convolution_forward::desc(prop, algo, k->act, any_weights, p.out, strides, pad, pad), add_attr, engine_);
  k->fwd_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(prop, algo, k->act, horner_pd.weights_desc(), p.out, strides, pad, pad), engine_);
  dnnl::post_ops sum;
  sum.append_sum(1.0f);
  dnnl::primitive_attr acc_attr;
  acc_attr.set_post_ops(sum);
  k->fwd_acc_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(prop, algo, k->act, k->fwd_pd.weights_desc(), p.out, strides, pad, pad), acc_attr,
      engine_);
  // Backward-weights takes diff_dst in the input type; its hint is the forward with that dst type.
  const dnnl::convolution_forward::primitive_desc hint =
      input_type == memory::data_type::f32
          ? k->fwd_pd
          : dnnl::convolution_forward::primitive_desc(
                dnnl::convolution_forward::desc(prop, algo, k->act, any_weights, k->act, strides, pad, pad), engine_);
  k->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      dnnl::convolution_backward_weights::desc(algo, k->act, any_diff_weights, k->act, strides, pad, pad), engine_,
      hint);
  k->fwd = dnnl::convolution_forward(k->fwd_pd);
  k->fwd_acc = dnnl::convolution_forward(k->fwd_acc_pd);
  k->bwd_weights = dnnl::convolution_backward_weights(k->bwd_weights_pd);

  k->fwd_weights_plain = k->fwd_pd.weights_desc() == plain;
  if (!k->fwd_weights_plain)
    k->fwd_weights_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(engine_, plain, engine_, k->fwd_pd.weights_desc()));
  k->diff_weights_plain = k->bwd_weights_pd.diff_weights_desc() == plain;
  if (!k->diff_weights_plain) {
    k->diff_weights_scratch = memory(k->bwd_weights_pd.diff_weights_desc(), engine_);
    k->diff_weights_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(engine_, k->bwd_weights_pd.diff_weights_desc(), engine_, plain));
  }
  if (pixel_matmul_applies(shape, p.block)) k->pixel = make_pixel_matmul(shape, p.block, input_type);
  if (k->pixel)
    k->impl = detail::concat("fwd pixel matmul ", k->pixel->impl, ", bwd-weights pixel matmul",
                             input_type == memory::data_type::f32 ? " sgemm" : "");
  else
    k->impl = detail::concat(k->dense ? "dense block-diagonal " : "", "fwd ", k->fwd_pd.impl_info_str(),
                             ", bwd-weights ", k->bwd_weights_pd.impl_info_str());
  return k;
}

CpuBackend::ConvPrimitives& CpuBackend::primitives(const ConvShape& shape) {
  ShapeKey key{shape.batch, shape.in_channels, shape.out_channels, shape.height,
               shape.width, shape.kernel,      shape.groups,       shape.precision == ConvPrecision::bf16};
  auto it = cache_.find(key);
  if (it != cache_.end()) return *it->second;
  shape.validate();
  return *dnnl_checked("primitive creation", shape, [&] {
    auto p = std::make_unique<ConvPrimitives>();
    p->plain_act =
        memory::desc({shape.batch, shape.in_channels, shape.height, shape.width}, memory::data_type::f32, tag::nchw);
    p->plain_weights = plain_weights_desc(shape);
    memory::desc any_weights(p->plain_weights.dims(), memory::data_type::f32, tag::any);
    memory::dims strides{1, 1}, pad{shape.kernel / 2, shape.kernel / 2};
    auto algo = dnnl::algorithm::convolution_direct;

    // The layout: blocked_tag_, unless oneDNN has only its reference kernel there (grouped convolutions whose
    // channels per group are not a multiple of the block, e.g. GS-SOC's 32 channels in 4 groups in nChw16c,
    // run 50x slower): then nChw8c, then nhwc. A bf16 request on a CPU with AMX takes nhwc first where oneDNN
    // has an AMX bf16 forward there and not in blocked_tag_ (oneDNN 2.6's AMX convolutions run only in nhwc; there
    // the forward is 1.3-4x faster than float32 in nChw16c, grouped (GS-SOC's 16- to 128-channel groups) and dense,
    // while its AVX512-BF16 kernels in nChw16c gain nothing on such a CPU; its AMX backward-weights is on par for
    // grouped shapes, 4-6x slower for dense ones: the measured choice keeps float32 there); its float32 passes
    // (fallback, backward-data) then run in nhwc too (at the speed of nChw16c for dense backward-weights).
    std::vector<tag> layouts{blocked_tag_};
    if (blocked_tag_ != tag::nChw8c) layouts.push_back(tag::nChw8c);
    layouts.push_back(tag::nhwc);
    // Not at planes of at most 4 pixels (GS-SOC's 1024 / 2048 channels at 1x1 and 2x2): there oneDNN's AMX
    // backward-weights runs at reference speed (1024 channels at 1x1, 64 images: 516 CPU ms against 9 in
    // float32), and its AMX forward is slower than jit_bf16 in nChw16c (1024 channels 2x2 g4, 128 images: 27.5
    // against 15.9 CPU ms; 1024 channels 1x1: 14.7 against 7.9).
    if (key.bf16 && has_amx_ && shape.height * shape.width > 4 && !amx_forward(shape, blocked_tag_) &&
        amx_forward(shape, tag::nhwc))
      layouts.insert(layouts.begin(), tag::nhwc);
    for (tag layout : layouts) {
      p->out = activation_desc(shape, shape.in_channels, layout);
      dnnl::convolution_forward::desc fwd(dnnl::prop_kind::forward_training, algo, p->out, any_weights, p->out, strides,
                                          pad, pad);
      const std::string impl = dnnl::convolution_forward::primitive_desc(fwd, engine_).impl_info_str();
      p->layout = layout;
      p->block = layout == tag::nChw16c ? 16 : layout == tag::nChw8c ? 8 : shape.in_channels;
      if (impl.rfind("ref", 0) != 0) break;
    }
    p->f32 = make_kernels(shape, *p, memory::data_type::f32);

    dnnl::convolution_backward_data::desc bwd(algo, p->out, any_weights, p->out, strides, pad, pad);
    p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(bwd, engine_, p->f32->fwd_pd);
    p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
    p->bwd_weights_plain = p->bwd_data_pd.weights_desc() == p->plain_weights;
    if (!p->bwd_weights_plain)
      p->bwd_weights_reorder = dnnl::reorder(
          dnnl::reorder::primitive_desc(engine_, p->plain_weights, engine_, p->bwd_data_pd.weights_desc()));
    p->impl =
        detail::concat(p->block == 16  ? "nChw16c"
                       : p->block == 8 ? "nChw8c"
                                       : "nhwc",
                       ": ", p->f32->impl,
                       gemm_backward_weights(shape) && !p->f32->pixel ? " (float32: im2col + sgemm per group)" : "",
                       ", bwd-data ", p->bwd_data_pd.impl_info_str());
    auto& slot = cache_[key];
    slot = std::move(p);
    return slot.get();
  });
}

bool CpuBackend::amx_forward(const ConvShape& shape, memory::format_tag layout) const {
  try {
    memory::desc act({shape.batch, shape.in_channels, shape.height, shape.width}, memory::data_type::bf16, layout);
    memory::desc out = activation_desc(shape, shape.in_channels, layout);
    memory::desc weights((bf16_as_dense(shape) ? dense_weights_desc(shape) : plain_weights_desc(shape)).dims(),
                         memory::data_type::bf16, tag::any);
    memory::dims strides{1, 1}, pad{shape.kernel / 2, shape.kernel / 2};
    dnnl::convolution_forward::desc fwd(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, act,
                                        weights, out, strides, pad, pad);
    const std::string impl = dnnl::convolution_forward::primitive_desc(fwd, engine_).impl_info_str();
    return impl.find("amx") != std::string::npos;
  } catch (const dnnl::error&) {
    return false;
  }
}

std::string CpuBackend::implementation(const ConvShape& shape) {
  ConvPrimitives& p = primitives(shape);
  if (shape.precision != ConvPrecision::bf16) return p.impl;
  conv_precision(shape, ConvPass::forward);
  conv_precision(shape, ConvPass::backward_weights);
  return detail::concat(
      p.impl, "; bf16 requested: ", p.bf16_choices, p.bf16 ? "; bf16 " + p.bf16->impl : "",
      (gemm_backward_weights(shape) || nhwc_gemm_backward_weights(shape, p.block)) && p.bf16 && !p.bf16->pixel
          ? "; bf16 bwd-weights: im2col + bf16 matmul " + bf16_gemm_implementation(shape)
          : "");
}

int64_t CpuBackend::conv_buffer_size(const ConvShape& shape) {
  return static_cast<int64_t>(primitives(shape).out.get_size() / sizeof(float));
}

void CpuBackend::to_conv_layout(const ConvShape& shape, const float* nchw, float* dst) {
  auto& p = primitives(shape);
  const int64_t block = p.block;
  const int64_t c = shape.in_channels, blocks = (c + block - 1) / block, plane = shape.height * shape.width;
#pragma omp parallel for collapse(2) schedule(static) if (shape.batch * blocks * plane * block > kParallelFloats)
  for (int64_t n = 0; n < shape.batch; ++n)
    for (int64_t b = 0; b < blocks; ++b)
      block_planes(nchw + (n * c + b * block) * plane, std::min(block, c - b * block), plane, block,
                   dst + (n * blocks + b) * plane * block);
}

void CpuBackend::from_conv_layout(const ConvShape& shape, const float* src, float* nchw) {
  auto& p = primitives(shape);
  const int64_t block = p.block;
  const int64_t c = shape.out_channels, blocks = (c + block - 1) / block, plane = shape.height * shape.width;
#pragma omp parallel for collapse(2) schedule(static) if (shape.batch * blocks * plane * block > kParallelFloats)
  for (int64_t n = 0; n < shape.batch; ++n)
    for (int64_t b = 0; b < blocks; ++b)
      unblock_planes(src + (n * blocks + b) * plane * block, std::min(block, c - b * block), plane, block,
                     nchw + (n * c + b * block) * plane);
}

int64_t CpuBackend::conv_weights_size(const ConvShape& shape, ConvPass pass) {
  auto& p = primitives(shape);
  if (pass == ConvPass::backward_data)
    return static_cast<int64_t>((p.bwd_data_pd.weights_desc().get_size() + sizeof(float) - 1) / sizeof(float));
  return forward_weights_floats(kernels(shape, pass));
}

int64_t CpuBackend::forward_weights_floats(const ConvKernels& k) {
  const size_t bytes = k.pixel ? k.pixel->weights.get_size() : k.fwd_pd.weights_desc().get_size();
  return static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
}

void CpuBackend::weights_to_conv_layout(const ConvShape& shape, ConvPass pass, const float* plain, float* dst) {
  auto& p = primitives(shape);
  const bool forward = pass != ConvPass::backward_data;
  ConvKernels* k = forward ? &kernels(shape, pass) : nullptr;
  if (forward && k->pixel) {
    pixel_weights(shape, *k->pixel, plain, dst);
    return;
  }
  const bool dense = forward && k->dense;  // a bf16 dense kernel's weights: from the block-diagonal expansion
  if (dense) {
    expand_groups(shape, plain, static_cast<float*>(k->dense_plain.get_data_handle()));
    plain = static_cast<const float*>(k->dense_plain.get_data_handle());
  }
  if (forward ? k->fwd_weights_plain : p.bwd_weights_plain) {  // float32 weights in the plain layout
    copy(plain, dst, shape.weight_count());
    return;
  }
  dnnl_checked("weights reorder", shape, [&] {
    auto desc = forward ? k->fwd_pd.weights_desc() : p.bwd_data_pd.weights_desc();
    memory in(dense ? dense_weights_desc(shape) : p.plain_weights, engine_, const_cast<float*>(plain)),
        out(desc, engine_, dst);
    (forward ? k->fwd_weights_reorder : p.bwd_weights_reorder).execute(stream_, in, out);
    stream_.wait();
  });
}

void CpuBackend::conv_forward(const ConvShape& shape, const float* src, const float* weights, float* dst,
                              bool accumulate) {
  auto& p = primitives(shape);
  auto& k = kernels(shape, ConvPass::forward);
  if (k.pixel) {
    run_pixel_matmul(shape, *k.pixel, src, weights, 1.0f, accumulate ? dst : nullptr, dst);
    return;
  }
  dnnl_checked("convolution forward", shape, [&] {
    memory s(k.act, engine_, const_cast<float*>(src));
    memory w(k.fwd_pd.weights_desc(), engine_, const_cast<float*>(weights));
    memory d(p.out, engine_, dst);
    (accumulate ? k.fwd_acc : k.fwd).execute(stream_, {{DNNL_ARG_SRC, s}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, d}});
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
  run_backward_weights(shape, kernels(shape, ConvPass::backward_weights), src, diff_dst, diff_weights);
}

void CpuBackend::run_backward_weights(const ConvShape& shape, ConvKernels& k, const float* src, const float* diff_dst,
                                      float* diff_weights) {
  auto& p = primitives(shape);
  if (k.pixel) {
    run_pixel_backward_weights(shape, k.impl, *k.pixel, src, diff_dst, diff_weights);
    return;
  }
  if (gemm_backward_weights(shape)) {
    if (&k == p.f32.get())
      run_gemm_backward_weights(shape, p, src, diff_dst, diff_weights);
    else
      run_bf16_gemm_backward_weights(shape, p.block, src, diff_dst, diff_weights);
    return;
  }
  if (&k == p.bf16.get() && nhwc_gemm_backward_weights(shape, p.block)) {
    run_bf16_nhwc_gemm_backward_weights(shape, src, diff_dst, diff_weights);
    return;
  }
  dnnl_checked("convolution backward-weights", shape, [&] {
    memory s(k.bwd_weights_pd.src_desc(), engine_, const_cast<float*>(src));
    memory dd(k.bwd_weights_pd.diff_dst_desc(), engine_, const_cast<float*>(diff_dst));
    memory plain = k.dense ? k.dense_plain : memory(p.plain_weights, engine_, diff_weights);
    memory dw = k.diff_weights_plain ? plain : k.diff_weights_scratch;
    k.bwd_weights.execute(stream_, {{DNNL_ARG_SRC, s}, {DNNL_ARG_DIFF_DST, dd}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
    if (!k.diff_weights_plain) k.diff_weights_reorder.execute(stream_, k.diff_weights_scratch, plain);
    stream_.wait();
  });
  if (k.dense) diagonal_groups(shape, static_cast<const float*>(k.dense_plain.get_data_handle()), diff_weights);
}

void CpuBackend::expand_groups(const ConvShape& shape, const float* grouped, float* dense) {
  const int64_t c = shape.in_channels, cg = c / shape.groups, taps = shape.kernel * shape.kernel;
  std::fill(dense, dense + c * c * taps, 0.0f);
  for (int64_t o = 0; o < c; ++o) {  // output channel o of group o / cg: its cg inputs at [o / cg * cg, ...)
    const float* row = grouped + o * cg * taps;
    std::copy(row, row + cg * taps, dense + (o * c + o / cg * cg) * taps);
  }
}

void CpuBackend::diagonal_groups(const ConvShape& shape, const float* dense, float* grouped) {
  const int64_t c = shape.in_channels, cg = c / shape.groups, taps = shape.kernel * shape.kernel;
  for (int64_t o = 0; o < c; ++o) {
    const float* row = dense + (o * c + o / cg * cg) * taps;
    std::copy(row, row + cg * taps, grouped + o * cg * taps);
  }
}

bool CpuBackend::gemm_backward_weights(const ConvShape& shape) { return shape.height * shape.width <= 4; }

void CpuBackend::run_gemm_backward_weights(const ConvShape& shape, const ConvPrimitives& p, const float* src,
                                           const float* diff_dst, float* diff_weights) {
  // Row r = (n, y, x) of the N*H*W output pixels: cols[r, (ci, ky, kx)] = X(n, ci, y + ky - k/2, x + kx - k/2)
  // (0 outside), dy[r, co] = dY(n, co, y, x); conv layout: element (n, c, y, x) at
  // ((n * blocks + c / block) * H * W + y * W + x) * block + c % block. Group i's channels are the columns
  // [i * cg, (i + 1) * cg) of dy and [i * cg * k^2, (i + 1) * cg * k^2) of cols: one sgemm per group.
  const int64_t n = shape.batch, c = shape.in_channels, h = shape.height, w = shape.width, k = shape.kernel;
  const int64_t plane = h * w, rows = n * plane, taps = k * k, cols = c * taps, pad = k / 2;
  const int64_t block = p.block, blocks = (c + block - 1) / block;
  const size_t needed = static_cast<size_t>(rows * (cols + c));
  if (gemm_scratch_.size() < needed) gemm_scratch_.resize(needed);
  float* im2col = gemm_scratch_.data();
  float* dy = im2col + rows * cols;
  auto at = [&](int64_t image, int64_t channel, int64_t pixel) {
    return ((image * blocks + channel / block) * plane + pixel) * block + channel % block;
  };
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t image = r / plane, y = r % plane / w, x = r % w;
    float* row = im2col + r * cols;
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx) {
          const int64_t sy = y + ky - pad, sx = x + kx - pad;
          row[ci * taps + ky * k + kx] =
              sy >= 0 && sy < h && sx >= 0 && sx < w ? src[at(image, ci, sy * w + sx)] : 0.0f;
        }
    for (int64_t co = 0; co < c; ++co) dy[r * c + co] = diff_dst[at(image, co, r % plane)];
  }
  // Group i: dW_i [cg_out, cg_in * k * k] (the plain [g, o, i, k, k] layout) = dy_i^T im2col_i.
  const int64_t cg = c / shape.groups, group_cols = cg * taps;
  for (int64_t i = 0; i < shape.groups; ++i) {
    const dnnl::status status =
        dnnl::sgemm('T', 'N', cg, group_cols, rows, 1.0f, dy + i * cg, c, im2col + i * group_cols, cols, 0.0f,
                    diff_weights + i * cg * group_cols, group_cols);
    require<BackendError>(status == dnnl::status::success, "oneDNN sgemm failed (status ", static_cast<int>(status),
                          ") for the backward-weights of ", shape.str());
  }
}

CpuBackend::ScaledPrimitive& CpuBackend::scaled_primitive(const ConvShape& shape, ConvKernels& k, float alpha,
                                                          bool addend, bool rounded) {
  auto key = std::make_tuple(alpha, addend, rounded);
  auto it = k.scaled.find(key);
  if (it != k.scaled.end()) return it->second;
  return dnnl_checked("scaled forward primitive creation", shape, [&]() -> ScaledPrimitive& {
    const memory::desc& out = primitives(shape).out;
    memory::dims strides{1, 1}, pad{shape.kernel / 2, shape.kernel / 2};
    dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, k.act,
                                         k.fwd_pd.weights_desc(), rounded ? k.act : out, strides, pad, pad);
    dnnl::post_ops ops;
    ScaledPrimitive entry;
    if (alpha != 1.0f) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_linear, alpha, 0.0f);
    if (addend) {
      entry.addend_index = ops.len();
      ops.append_binary(dnnl::algorithm::binary_add, out);
    }
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    dnnl::convolution_forward::primitive_desc pd(desc, attr, engine_);
    // oneDNN's reference kernel here would be ~1000x slower than the forward (see make_kernels): refuse it.
    require<BackendError>(std::string(pd.impl_info_str()).rfind("ref", 0) != 0 ||
                              std::string(k.fwd_pd.impl_info_str()).rfind("ref", 0) == 0,
                          "oneDNN has only its reference kernel for the scaled forward of ", shape.str(), " (",
                          k.fwd_pd.impl_info_str(), " without post-ops)");
    entry.primitive = dnnl::convolution_forward(pd);
    if (k.scaled.empty()) k.impl += detail::concat(", fwd-scaled ", pd.impl_info_str());
    return k.scaled.emplace(key, std::move(entry)).first->second;
  });
}

void CpuBackend::conv_forward_scaled(const ConvShape& shape, const float* src, const float* weights, float alpha,
                                     const float* addend, float* dst) {
  run_scaled(shape, kernels(shape, ConvPass::forward), src, weights, alpha, addend, dst);
}

void CpuBackend::conv_forward_scaled_to_input(const ConvShape& shape, const float* src, const float* weights,
                                              float alpha, const float* addend, float* scratch, float* dst_input) {
  if (conv_precision(shape, ConvPass::forward) != ConvPrecision::bf16) {  // float32 kernels: no bf16 dst
    Backend::conv_forward_scaled_to_input(shape, src, weights, alpha, addend, scratch, dst_input);
    return;
  }
  run_scaled(shape, kernels(shape, ConvPass::forward), src, weights, alpha, addend, dst_input, true);
}

void CpuBackend::run_scaled(const ConvShape& shape, ConvKernels& k, const float* src, const float* weights, float alpha,
                            const float* addend, float* dst, bool rounded) {
  if (k.pixel) {
    run_pixel_matmul(shape, *k.pixel, src, weights, alpha, addend, dst, rounded);
    return;
  }
  auto& p = primitives(shape);
  auto& scaled = scaled_primitive(shape, k, alpha, addend != nullptr, rounded);
  dnnl_checked("scaled convolution forward", shape, [&] {
    memory s(k.act, engine_, const_cast<float*>(src));
    memory w(k.fwd_pd.weights_desc(), engine_, const_cast<float*>(weights));
    memory d(rounded ? k.act : p.out, engine_, dst);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, s}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, d}};
    if (addend)
      args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(scaled.addend_index) | DNNL_ARG_SRC_1,
                   memory(p.out, engine_, const_cast<float*>(addend)));
    scaled.primitive.execute(stream_, args);
    stream_.wait();
  });
}

// ---------------------------------------------------------------- bf16

void CpuBackend::check_precision(ConvPrecision precision) const {
  require_setting(precision != ConvPrecision::tf32, {"precision"},
                  "{0} tf32 is a CUDA tensor-core format; the CPU backend runs {0} fp32 or bf16");
  require_setting(precision != ConvPrecision::bf16 || has_bf16_, {"precision"},
                  "{0} bf16 needs a CPU with AVX512-BF16 (oneDNN's ", "avx512_core_bf16 ISA); oneDNN finds none here",
                  std::getenv("DNNL_MAX_CPU_ISA") ? " (DNNL_MAX_CPU_ISA is "
                                                    "set)"
                                                  : "",
                  "; use {0} fp32");
}

std::vector<std::string> CpuBackend::precision_choices() const {
  std::vector<std::string> out;
  for (const auto& [key, p] : cache_)
    if (!p->bf16_choices.empty())
      out.push_back(detail::concat("batch ", key.n, ", ", key.ci, " ch ", key.h, "x", key.w, " k", key.k, " g", key.g,
                                   " ",
                                   p->block == 16  ? "nChw16c"
                                   : p->block == 8 ? "nChw8c"
                                                   : "nhwc",
                                   ": ", p->bf16_choices));
  return out;
}

void CpuBackend::set_precision_choice(PrecisionChoice choice) {
  if (choice == precision_choice_) return;
  precision_choice_ = choice;
  for (auto& entry : cache_) {
    entry.second->bf16_forward.reset();
    entry.second->bf16_backward_weights.reset();
    entry.second->bf16_choices.clear();
  }
}

ConvPrecision CpuBackend::conv_precision(const ConvShape& shape, ConvPass pass) {
  if (shape.precision != ConvPrecision::bf16 || pass == ConvPass::backward_data || !has_bf16_)
    return ConvPrecision::fp32;
  ConvPrimitives& p = primitives(shape);
  std::optional<bool>& chosen = pass == ConvPass::forward ? p.bf16_forward : p.bf16_backward_weights;
  if (!chosen) chosen = choose_bf16(shape, p, pass);
  return *chosen ? ConvPrecision::bf16 : ConvPrecision::fp32;
}

CpuBackend::ConvKernels& CpuBackend::kernels(const ConvShape& shape, ConvPass pass) {
  ConvPrimitives& p = primitives(shape);
  return conv_precision(shape, pass) == ConvPrecision::bf16 ? *p.bf16 : *p.f32;
}

namespace {

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// CPU seconds of the process over one call of `run` (which waits for its work). CPU time, not wall time: on a
// shared machine (load 10 on 2 cores) wall times of the same kernel vary by 2-4x with the other processes, and
// the choice flipped between runs at shapes where oneDNN's AMX forward takes 2.4x fewer CPU seconds (64 channels
// at 16x16 in 4 groups); the CPU time of a pass is the work it costs whatever else runs. All candidates run on
// the same OpenMP threads, so on an idle machine the order is the wall-time order.
template <typename F>
double seconds_of(F&& run) {
  const double start = process_cpu_seconds();
  run();
  return process_cpu_seconds() - start;
}

}  // namespace

// bf16 for `pass` at `shape`: only with an even number of values per image (so that conv inputs stack), only
// with oneDNN's jit kernels (its reference bf16 backward-weights at GS-SOC's 8-channel groups is ~3000x slower
// than float32), and, when measured, only where the bf16 pass including the rounding of its inputs
// (to_conv_input) beats float32: best of five interleaved runs each on scratch buffers (on a busy machine
// single runs vary by 2x), after first runs that drop a candidate more than too_slow_factor_ times slower
// (and slower than too_slow_seconds_).
bool CpuBackend::choose_bf16(const ConvShape& shape, ConvPrimitives& p, ConvPass pass) {
  const bool forward = pass == ConvPass::forward;
  const char* name = forward ? "fwd" : "bwd-weights";
  auto note = [&](const std::string& why, bool use) {
    p.bf16_choices += detail::concat(p.bf16_choices.empty() ? "" : ", ", name, use ? " bf16" : " fp32", " (", why, ")");
    return use;
  };
  if (precision_choice_ == PrecisionChoice::never) return note("never", false);
  // Stacked conv inputs (K buffers of N images back to back) need an even number of values per image.
  if (p.out.get_size() / sizeof(float) / static_cast<size_t>(shape.batch) % 2 != 0)
    return note("odd number of values per image", false);
  if (!p.bf16) {
    try {
      p.bf16 = make_kernels(shape, p, memory::data_type::bf16);
    } catch (const dnnl::error& e) {
      return note(detail::concat("no oneDNN bf16 kernel: ", e.what()), false);
    }
  }
  ConvKernels& low = *p.bf16;
  const std::string impl = forward ? low.fwd_pd.impl_info_str() : low.bwd_weights_pd.impl_info_str();
  // (backward-weights at the planes of gemm_backward_weights runs as im2col + bf16 matmul, not on this kernel)
  if (impl.rfind("ref", 0) == 0 &&
      (forward || !(gemm_backward_weights(shape) || nhwc_gemm_backward_weights(shape, p.block))))
    return note("oneDNN has only its reference kernel", false);
  if (precision_choice_ == PrecisionChoice::always) return note("always", true);
  bool& too_slow = forward ? p.bf16_forward_too_slow : p.bf16_backward_weights_too_slow;
  if (too_slow) return note("dropped earlier: its first run was too slow", false);

  // Scratch buffers of the shape (zeros: the kernels' time does not depend on the values).
  ConvKernels& high = *p.f32;
  const int64_t floats = static_cast<int64_t>(p.out.get_size() / sizeof(float));
  const int64_t weights = std::max({forward_weights_floats(high), forward_weights_floats(low),
                                    static_cast<int64_t>(p.plain_weights.get_size() / sizeof(float))});
  std::vector<float> a(static_cast<size_t>(floats)), b(a.size()), out(a.size()), a_low(a.size() / 2 + 1),
      b_low(a_low.size()), w_high(static_cast<size_t>(weights)), w_low(w_high.size());
  std::function<void()> run_high, run_low;
  if (forward) {  // the Horner step: x0 added as a post-op
    run_high = [&] { run_scaled(shape, high, a.data(), w_high.data(), 1.0f, b.data(), out.data()); };
    run_low = [&] {
      to_conv_input(shape, a.data(), a_low.data());
      run_scaled(shape, low, a_low.data(), w_low.data(), 1.0f, b.data(), out.data());
    };
  } else {
    run_high = [&] { run_backward_weights(shape, high, a.data(), b.data(), w_high.data()); };
    run_low = [&] {
      to_conv_input(shape, a.data(), a_low.data());
      to_conv_input(shape, b.data(), b_low.data());
      run_backward_weights(shape, low, a_low.data(), b_low.data(), w_high.data());
    };
  }
  // First runs (page faults, oneDNN's lazy set-up in both), float32 first: a bf16 kernel that is far slower
  // (oneDNN's AMX backward-weights at 1x1 planes runs at reference speed) costs one run, never five.
  const double first_high = seconds_of(run_high);
  const double first_low = seconds_of(run_low);
  char why[128];
  if (first_low > too_slow_factor_ * first_high && first_low > too_slow_seconds_) {
    too_slow = true;
    std::snprintf(why, sizeof(why), "dropped: first run %.2f CPU ms vs fp32 %.2f", 1e3 * first_low, 1e3 * first_high);
    return note(why, false);
  }
  double best_high = 1e300, best_low = 1e300;
  for (int round = 0; round < 5; ++round) {
    best_high = std::min(best_high, seconds_of(run_high));
    best_low = std::min(best_low, seconds_of(run_low));
    if (best_low > 2.0 * best_high) break;  // clearly slower: spare the other rounds
  }
  std::snprintf(why, sizeof(why), "%.2f CPU ms vs fp32 %.2f", 1e3 * best_low, 1e3 * best_high);
  return note(why, best_low < best_high);
}

int64_t CpuBackend::conv_input_size(const ConvShape& shape) {
  const ConvPrimitives& p = primitives(shape);
  return static_cast<int64_t>((p.out.get_size() / sizeof(float) + 1) / 2);
}

ORTHOCONV_SIMD_CLONES
void round_to_bf16(const float* src, uint16_t* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(bits));
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>(nan ? (bits >> 16) | 0x40u : rounded);
  }
}

void CpuBackend::to_conv_input(const ConvShape& shape, const float* src, float* dst) {
  const int64_t count = static_cast<int64_t>(primitives(shape).out.get_size() / sizeof(float));
  auto* out = reinterpret_cast<uint16_t*>(dst);
  constexpr int64_t kChunk = int64_t{1} << 14;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (count > kParallelFloats)
  for (int64_t c = 0; c < chunks; ++c)
    round_to_bf16(src + c * kChunk, out + c * kChunk, std::min(kChunk, count - c * kChunk));
}

}  // namespace orthoconv::cpu
