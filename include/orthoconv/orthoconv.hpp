// orthoconv/orthoconv.hpp: everything a user links against.
#pragma once

#include "orthoconv/backend.hpp"
#include "orthoconv/channel_shuffle.hpp"
#include "orthoconv/error.hpp"
#include "orthoconv/gs_soc_conv.hpp"
#include "orthoconv/jacobian.hpp"
#include "orthoconv/layer.hpp"
#include "orthoconv/maxmin.hpp"
#include "orthoconv/soc_conv.hpp"
#include "orthoconv/tensor.hpp"
