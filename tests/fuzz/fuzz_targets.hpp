// The bodies of the libFuzzer harnesses (fuzz_checkpoint.cpp, fuzz_cifar.cpp), shared with the regression test that
// runs every committed seed and crash input through them in the ordinary test suite (test_fuzz_regressions.cpp).
//
// Each writes the input to a private temporary file, reads it with the real loader and hands whatever loads to the
// code that consumes it, and returns 0. A rejection must be an orthoconv::Error; anything else (another exception,
// a crash, a hang, a sanitizer report) is a finding.
#pragma once

#include <cstddef>
#include <cstdint>

namespace orthoconv::fuzz {

// A checkpoint file: load_checkpoint (safetensors header, metadata, tensors), then the architecture and
// normalization metadata, the training state (train.*), and, for a small enough model, read_model_state and the
// optimizer state.
int checkpoint_input(const uint8_t* data, size_t size);

// A CIFAR-100 binary file of size / 3074 records (and the same file read as one record more, which must fail),
// then batches of what loads: make_batch and one augmented, shuffled BatchLoader epoch.
int cifar_input(const uint8_t* data, size_t size);

}  // namespace orthoconv::fuzz
