// orthoconv/orthoconv.hpp: everything public, in one include.
//
//   tensor, error, backend, layer             Tensor / Shape / Device, orthoconv::Error, the device interface
//   soc_conv, gs_soc_conv, channel_shuffle,   the orthogonal layers and MaxMin (forward, backward, parameters)
//   maxmin
//   model, model_state, checkpoint            LipConvnet, its checkpoints, load_model(): a trained model in one call
//   data                                      CIFAR-100 records, normalization, batches
//   certify, network_bound, certifying_pass,  margins and certified radii, verified Lipschitz bounds, the float64
//   bounds, jacobian, attack                  certifying pass, Jacobian singular values, L2 attacks
//   trainer, plot                             the training loop, certificate plots
//   communicator                              data-parallel jobs: MPI ranks, their all-reduce (docs/distributed.md)
//   runtime, cuda_options                     threads and peak memory; CUDA backend settings
//   limits                                    the bounds on sizes, series terms and threads, checked before allocating
// docs/library.md walks through a complete consumer program.
#pragma once

#include "orthoconv/attack.hpp"
#include "orthoconv/backend.hpp"
#include "orthoconv/bounds.hpp"
#include "orthoconv/certify.hpp"
#include "orthoconv/certifying_pass.hpp"
#include "orthoconv/channel_shuffle.hpp"
#include "orthoconv/checkpoint.hpp"
#include "orthoconv/communicator.hpp"
#include "orthoconv/cuda_options.hpp"
#include "orthoconv/data.hpp"
#include "orthoconv/error.hpp"
#include "orthoconv/gs_soc_conv.hpp"
#include "orthoconv/jacobian.hpp"
#include "orthoconv/layer.hpp"
#include "orthoconv/limits.hpp"
#include "orthoconv/maxmin.hpp"
#include "orthoconv/model.hpp"
#include "orthoconv/model_state.hpp"
#include "orthoconv/network_bound.hpp"
#include "orthoconv/onnx_export.hpp"
#include "orthoconv/plot.hpp"
#include "orthoconv/runtime.hpp"
#include "orthoconv/soc_conv.hpp"
#include "orthoconv/tensor.hpp"
#include "orthoconv/trainer.hpp"
#include "orthoconv/vnnlib.hpp"
