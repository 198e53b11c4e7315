// The typed handle of a registered operator, for calling torch_bn's ops through the dispatcher
// from C++ (keep it in a static: the lookup is by name).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

namespace torch_bn {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

} // namespace torch_bn
