# Decides whether the CUDA/cuDNN backend is built. ORTHOCONV_CUDA=AUTO builds it when both the toolkit and cuDNN
# are found; ON makes their absence an error. The backend itself lives in lib/backend/cuda.
include(CheckLanguage)
check_language(CUDA)
find_path(CUDNN_INCLUDE_DIR cudnn.h HINTS /usr/local/cuda/include /usr/include /usr/local/include)
find_library(CUDNN_LIBRARY cudnn HINTS /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu)
if(CMAKE_CUDA_COMPILER AND CUDNN_INCLUDE_DIR AND CUDNN_LIBRARY AND EXISTS ${CMAKE_SOURCE_DIR}/lib/backend/cuda/CMakeLists.txt)
  set(ORTHOCONV_WITH_CUDA ON)
elseif(ORTHOCONV_CUDA STREQUAL "ON")
  message(FATAL_ERROR "ORTHOCONV_CUDA=ON but the CUDA backend cannot be built (nvcc: '${CMAKE_CUDA_COMPILER}', "
                      "cudnn.h: '${CUDNN_INCLUDE_DIR}', libcudnn: '${CUDNN_LIBRARY}')")
endif()
message(STATUS "orthoconv CUDA backend: ${ORTHOCONV_WITH_CUDA}")
