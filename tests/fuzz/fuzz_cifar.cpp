// libFuzzer entry point: CIFAR-100 binary files (see fuzz_targets.hpp).
#include "fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return orthoconv::fuzz::cifar_input(data, size);
}
