// libFuzzer entry point: checkpoint files (see fuzz_targets.hpp).
#include "fuzz_targets.hpp"

#include "orthoconv/runtime.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  orthoconv::set_thread_count(1);  // one thread per input: the fuzzer runs many inputs, not one big one
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return orthoconv::fuzz::checkpoint_input(data, size);
}
