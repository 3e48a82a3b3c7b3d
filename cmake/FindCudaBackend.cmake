# Decides whether the CUDA/cuDNN backend is built. ORTHOCONV_CUDA=AUTO builds it when both the toolkit and cuDNN
# are found; ON makes their absence an error. The backend itself lives in lib/backend/cuda.
#
# ORTHOCONV_CUDA_ARCHITECTURES (default "90": sm_90 machine code for the H100/H200 plus compute_90 PTX, which
# newer GPUs JIT-compile) is passed to CMAKE_CUDA_ARCHITECTURES; e.g. "80;90" or "native".
# cuDNN is looked up in the toolkit, the system, and CUDNN_ROOT (e.g. a pip wheel's nvidia/cudnn folder); set
# CUDNN_INCLUDE_DIR / CUDNN_LIBRARY to override (CUDNN_LIBRARY may name a versioned libcudnn.so.9).
set(ORTHOCONV_CUDA_ARCHITECTURES "90" CACHE STRING "CUDA architectures of the CUDA backend (CMAKE_CUDA_ARCHITECTURES syntax)")
include(CheckLanguage)
if(NOT CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "${ORTHOCONV_CUDA_ARCHITECTURES}")
endif()
check_language(CUDA)
set(_cudnn_hints /usr/local/cuda/include /usr/include /usr/local/include)
if(CUDNN_ROOT)
  list(PREPEND _cudnn_hints "${CUDNN_ROOT}/include")
endif()
find_path(CUDNN_INCLUDE_DIR cudnn.h HINTS ${_cudnn_hints})
find_library(CUDNN_LIBRARY NAMES cudnn libcudnn.so.9
  HINTS ${CUDNN_ROOT}/lib ${CUDNN_ROOT}/lib64 /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu)
if(CMAKE_CUDA_COMPILER AND CUDNN_INCLUDE_DIR AND CUDNN_LIBRARY AND EXISTS ${CMAKE_SOURCE_DIR}/lib/backend/cuda/CMakeLists.txt)
  set(ORTHOCONV_WITH_CUDA ON)
  # Enabled here, at the top level, so that the orthoconv target (lib/) can hold CUDA sources.
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  # CMake before 3.26 does not know nvcc's C++20 flag (nvcc >= 12 has it); the library is C++20 throughout.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
elseif(ORTHOCONV_CUDA STREQUAL "ON")
  message(FATAL_ERROR "ORTHOCONV_CUDA=ON but the CUDA backend cannot be built (nvcc: '${CMAKE_CUDA_COMPILER}', "
                      "cudnn.h: '${CUDNN_INCLUDE_DIR}', libcudnn: '${CUDNN_LIBRARY}')")
endif()
message(STATUS "orthoconv CUDA backend: ${ORTHOCONV_WITH_CUDA}")
if(ORTHOCONV_WITH_CUDA)
  message(STATUS "orthoconv CUDA architectures: ${CMAKE_CUDA_ARCHITECTURES}, cuDNN: ${CUDNN_LIBRARY}")
endif()
