#include "orthoconv/layer.hpp"

namespace orthoconv {

void Layer::zero_grad() {
  for (Parameter* p : parameters()) {
    if (p->grad.empty()) continue;
    backend_for(p->grad.device())->fill(p->grad.data(), p->grad.numel(), 0.0f);
  }
}

int64_t Layer::parameter_count() {
  int64_t count = 0;
  for (Parameter* p : parameters()) count += p->value.numel();
  return count;
}

}  // namespace orthoconv
