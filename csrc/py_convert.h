// Python -> C++ helpers shared by the pybind11 binding files (bindings.cpp, engine_bindings.cpp).
// Header-only, in namespace hdrt::pyconv (not hdrt::py, which would clash with the usual
// `namespace py = pybind11;` alias under `using namespace hdrt;`).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "message.h"

#ifdef HYBRIDIFF_RT_WITH_CUDA
#include "ipc_engine.h"
#endif

namespace hdrt {
namespace pyconv {

namespace pb = pybind11;

// Poll hook for waits that released the GIL (called about every 20 ms): reacquires the GIL and
// raises the pending Python exception (e.g. KeyboardInterrupt) so Ctrl-C interrupts the wait.
inline void check_python_signals() {
  pb::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw pb::error_already_set();
}

// One tensor spec: the tuple (dtype: str, shape: list[int], nbytes: int).
inline TensorSpec spec_from(const pb::handle& item) {
  auto t = item.cast<pb::tuple>();
  if (t.size() != 3) throw pb::value_error("a tensor spec is (dtype: str, shape: list[int], nbytes: int)");
  TensorSpec s;
  s.dtype = t[0].cast<std::string>();
  s.shape = t[1].cast<std::vector<int64_t>>();
  s.nbytes = t[2].cast<uint64_t>();
  return s;
}

// A sequence of tensor specs: [(dtype: str, shape: list[int], nbytes: int), ...].
inline std::vector<TensorSpec> specs_from(const pb::sequence& seq) {
  std::vector<TensorSpec> out;
  for (auto item : seq) out.push_back(spec_from(item));
  return out;
}

#ifdef HYBRIDIFF_RT_WITH_CUDA
// A sequence of device tensor references: [(data_ptr: int, nbytes: int, dtype: str,
// shape: list[int]), ...] (data_ptr as from tensor.data_ptr()). CUDA builds only, like TensorRef.
inline std::vector<TensorRef> refs_from(const pb::sequence& seq) {
  std::vector<TensorRef> out;
  for (auto item : seq) {
    auto t = item.cast<pb::tuple>();
    if (t.size() != 4)
      throw pb::value_error("a tensor reference is (data_ptr: int, nbytes: int, dtype: str, shape: list[int])");
    TensorRef r;
    r.ptr = t[0].cast<uintptr_t>();
    r.spec.nbytes = t[1].cast<uint64_t>();
    r.spec.dtype = t[2].cast<std::string>();
    r.spec.shape = t[3].cast<std::vector<int64_t>>();
    out.push_back(std::move(r));
  }
  return out;
}
#endif

}  // namespace pyconv
}  // namespace hdrt
