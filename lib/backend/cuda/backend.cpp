// The CUDA backend's entry points: cuda_available(), cuda_backend(), the process-wide CudaOptions, and the
// backend's construction and host <-> device copies. Operations live beside their CPU twins' names:
// conv.cpp (cuDNN), elementwise.cu, maxmin.cu, filter.cu, train_ops.cu.
#include <cstdlib>
#include <mutex>

#include "backend/cuda/cuda_backend.hpp"
#include "backend/cuda/cuda_check.hpp"

namespace orthoconv {

namespace cuda {

CudaBackend::CudaBackend() {
  cudaStream_t s = stream();  // throws BackendError without a device
  int device = 0;
  ORTHOCONV_CUDA_CHECK(cudaGetDevice(&device));
  cudaDeviceProp props{};
  ORTHOCONV_CUDA_CHECK(cudaGetDeviceProperties(&props, device));
  int runtime = 0, driver = 0;
  ORTHOCONV_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  ORTHOCONV_CUDA_CHECK(cudaDriverGetVersion(&driver));
  const size_t cudnn_version = cudnnGetVersion();
  require<BackendError>(cudnn_version / 10000 == CUDNN_MAJOR, "the cuDNN library loaded at run time is version ",
                        cudnn_version, ", but orthoconv was built against cuDNN ", CUDNN_MAJOR, ".", CUDNN_MINOR);
  compute_capability_ = props.major * 10 + props.minor;
  ORTHOCONV_CUDNN_CHECK(cudnnCreate(&cudnn_));
  ORTHOCONV_CUDNN_CHECK(cudnnSetStream(cudnn_, s));
  ORTHOCONV_CUBLAS_CHECK(cublasCreate(&cublas_));
  ORTHOCONV_CUBLAS_CHECK(cublasSetStream(cublas_, s));
  ORTHOCONV_CUBLAS_CHECK(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
  ORTHOCONV_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
  name_ = detail::concat("cuda (", props.name, ", sm_", props.major, props.minor, ", ", props.totalGlobalMem >> 30,
                         " GiB; CUDA runtime ", runtime / 1000, ".", (runtime % 1000) / 10, ", driver ", driver / 1000,
                         ".", (driver % 1000) / 10, "; cuDNN ", cudnn_version / 10000, ".",
                         (cudnn_version % 10000) / 100, ".", cudnn_version % 100, ")");
}

// Plans hold cuDNN descriptors; the handles go last. Never throws (errors at exit are ignored).
CudaBackend::~CudaBackend() {
  plans_.clear();
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (cudnn_ != nullptr) cudnnDestroy(cudnn_);
}

void CudaBackend::set_options(const CudaOptions& options) {
  if (options.allow_tf32 != options_.allow_tf32 || options.find_algorithms != options_.find_algorithms) {
    synchronize();
    plans_.clear();
  }
  options_ = options;
  ORTHOCONV_CUBLAS_CHECK(
      cublasSetMathMode(cublas_, options.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
}

void CudaBackend::copy(const float* src, float* dst, int64_t count) {
  if (src == dst || count <= 0) return;
  expect_device("copy", src, dst);
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(float), cudaMemcpyDeviceToDevice, stream()));
}

void CudaBackend::to_host(const float* src, float* host_dst, int64_t count) {
  if (count <= 0) return;
  expect_device("to_host", src);
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(host_dst, src, static_cast<size_t>(count) * sizeof(float), cudaMemcpyDeviceToHost, stream()));
  ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

// Waits for the copy, so the caller may reuse or free host_src at once (pinned or not).
void CudaBackend::from_host(const float* host_src, float* dst, int64_t count) {
  if (count <= 0) return;
  expect_device("from_host", dst);
  ORTHOCONV_CUDA_CHECK(
      cudaMemcpyAsync(dst, host_src, static_cast<size_t>(count) * sizeof(float), cudaMemcpyHostToDevice, stream()));
  ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void CudaBackend::synchronize() { ORTHOCONV_CUDA_CHECK(cudaStreamSynchronize(stream())); }

namespace {

std::mutex& options_mutex() {
  static std::mutex m;
  return m;
}
CudaOptions& pending_options() {
  static CudaOptions options = [] {
    CudaOptions o;
    const char* check = std::getenv("ORTHOCONV_CUDA_CHECK_POINTERS");
    o.check_pointers = check != nullptr && check[0] == '1';
    const char* find = std::getenv("ORTHOCONV_CUDNN_FIND");
    o.find_algorithms = !(find != nullptr && find[0] == '0');
    return o;
  }();
  return options;
}

}  // namespace

}  // namespace cuda

bool cuda_available() { return cuda::device_present(); }

std::shared_ptr<Backend> cuda_backend() {
  std::string why;
  if (!cuda::device_present(&why)) throw BackendError("the CUDA backend is built in, but no GPU can be used: " + why);
  // Never destroyed: the CUDA runtime may be gone when static destructors run.
  static std::shared_ptr<cuda::CudaBackend>* instance = [] {
    auto backend = std::make_shared<cuda::CudaBackend>();
    std::lock_guard<std::mutex> lock(cuda::options_mutex());
    backend->set_options(cuda::pending_options());
    return new std::shared_ptr<cuda::CudaBackend>(std::move(backend));
  }();
  return *instance;
}

void set_cuda_options(const CudaOptions& options) {
  {
    std::lock_guard<std::mutex> lock(cuda::options_mutex());
    cuda::pending_options() = options;
  }
  if (cuda::device_present()) std::static_pointer_cast<cuda::CudaBackend>(cuda_backend())->set_options(options);
}

CudaOptions cuda_options() {
  std::lock_guard<std::mutex> lock(cuda::options_mutex());
  return cuda::pending_options();
}

}  // namespace orthoconv
