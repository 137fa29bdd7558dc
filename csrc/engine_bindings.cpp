// pybind11 bindings of the CUDA transfer engine (compiled only with CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "cuda_check.h"
#include "ipc_engine.h"
#include "py_convert.h"

#ifdef HYBRIDIFF_RT_FAKE_CUDA
#include "testing/fake_cudart.h"
#endif

namespace py = pybind11;
using namespace hdrt;
using pyconv::check_python_signals;
using pyconv::refs_from;
using pyconv::specs_from;

namespace {

// An Engine call taking (peer, tensors, what, stream) for Python: parses the tensor tuples, then
// runs without the GIL (it never blocks on the peer, but may take the channel's lock).
template <class R>
auto tensors_call(R (Engine::*fn)(int, const std::vector<TensorRef>&, const std::string&,
                                  uintptr_t)) {
  return [fn](Engine& e, int peer, const py::sequence& tensors, const std::string& what,
              uintptr_t stream) {
    auto refs = refs_from(tensors);
    py::gil_scoped_release nogil;
    return (e.*fn)(peer, refs, what, stream);
  };
}

}  // namespace

void bind_engine(py::module_& m) {
  py::class_<Engine>(m, "Engine", py::module_local(),
                     "CUDA IPC transfer engine of one rank. Pointers and streams are integers "
                     "(tensor.data_ptr(), torch.cuda.current_stream().cuda_stream).")
      .def(py::init([](int rank, int world_size, int device, uint32_t num_slots,
                       uint64_t slot_bytes, int64_t timeout_ms, const std::string& shm_prefix,
                       const std::vector<int>& staging) {
             EngineConfig c;
             c.rank = rank;
             c.world_size = world_size;
             c.device = device;
             c.num_slots = num_slots;
             c.slot_bytes = slot_bytes;
             c.timeout_ms = timeout_ms;
             c.shm_prefix = shm_prefix;
             c.staging = staging;
             return std::make_unique<Engine>(c);
           }),
           py::arg("rank"), py::arg("world_size"), py::arg("device"), py::arg("num_slots"),
           py::arg("slot_bytes"), py::arg("timeout_ms"), py::arg("shm_prefix"), py::arg("staging"))
      .def("export_handles", [](const Engine& e) { return py::bytes(e.export_handles()); })
      .def("connect",
           [](Engine& e, int peer, const py::bytes& blob, bool check_pid) {
             e.connect(peer, std::string(blob), check_pid);
           },
           py::arg("peer"), py::arg("blob"), py::arg("check_pid") = true)
      .def("unlink_shm", &Engine::unlink_shm)
      .def("send", tensors_call(&Engine::send), py::arg("dst"), py::arg("tensors"),
           py::arg("what"), py::arg("stream"))
      .def("wait_sent",
           [](Engine& e, int dst, uint64_t ticket, uintptr_t stream) {
             py::gil_scoped_release nogil;
             e.wait_sent(dst, ticket, stream, check_python_signals);
           },
           py::arg("dst"), py::arg("ticket"), py::arg("stream"))
      .def("recv",
           [](Engine& e, int src, const py::sequence& tensors, const std::string& what,
              uintptr_t stream) {
             auto refs = refs_from(tensors);
             py::gil_scoped_release nogil;
             e.recv(src, refs, what, stream, check_python_signals);
           },
           py::arg("src"), py::arg("tensors"), py::arg("what"), py::arg("stream"))
      .def("post_recv", tensors_call(&Engine::post_recv), py::arg("src"), py::arg("tensors"),
           py::arg("what"), py::arg("stream"),
           "Post a receive of the next message from `src` into `tensors`; the engine drains the "
           "slots into them as chunks arrive. Returns a ticket for wait_recv().")
      .def("wait_recv",
           [](Engine& e, int src, uint64_t ticket, uintptr_t stream) {
             py::gil_scoped_release nogil;
             e.wait_recv(src, ticket, stream, check_python_signals);
           },
           py::arg("src"), py::arg("ticket"), py::arg("stream"))
      .def("recv_settled", &Engine::recv_settled, py::arg("src"))
      .def("recv_stream", &Engine::recv_stream, py::arg("src"))
      .def("recv_view",
           [](Engine& e, int src, const py::sequence& specs, const std::string& what,
              uintptr_t stream) {
             auto s = specs_from(specs);
             py::gil_scoped_release nogil;
             return e.recv_view(src, s, what, stream, check_python_signals);
           },
           py::arg("src"), py::arg("specs"), py::arg("what"), py::arg("stream"))
      .def("release_view", &Engine::release_view, py::arg("src"), py::arg("stream"))
      .def("copy_stream", &Engine::copy_stream, py::arg("dst"))
      .def("staging", &Engine::staging, py::arg("peer"))
      .def("bytes_sent", &Engine::bytes_sent, py::arg("dst"))
      .def("settled", &Engine::settled, py::arg("dst"),
           "Highest send ticket to `dst` whose copies are enqueued (or that failed / was "
           "dropped); until then its source tensors must stay allocated.")
      .def("set_timeout", &Engine::set_timeout, py::arg("timeout_ms"))
      .def_property_readonly("timeout_ms", &Engine::timeout_ms)
      .def("abort", &Engine::abort, py::arg("reason"),
           "Fail every channel with `reason` so peers blocked on this rank stop waiting now.")
      .def("quiesce",
           [](Engine& e, int64_t timeout_ms) {
             py::gil_scoped_release nogil;
             return e.quiesce(timeout_ms);
           },
           py::arg("timeout_ms"))
      .def("close", [](Engine& e) {
        py::gil_scoped_release nogil;
        e.close();
      });

  m.def("device_sleep",
        [](uintptr_t stream, double microseconds) {
          HDRT_CUDA_CHECK(launch_device_sleep(reinterpret_cast<cudaStream_t>(stream),
                                              static_cast<uint64_t>(microseconds * 1000.0)));
        },
        py::arg("stream"), py::arg("microseconds"),
        "Enqueue a kernel that keeps `stream` busy for the given GPU time (tests: slow consumers).");

#ifdef HYBRIDIFF_RT_FAKE_CUDA
  m.def("_fake_set_stuck", &fake::set_stuck, py::arg("stuck"), py::arg("streams") = true,
        "Fake runtime only: nothing completes on the 'GPU' while stuck (a peer died mid-copy).");
  m.def("_fake_counters", &fake::counters,
        "Fake runtime only: how often cudaFree, cudaHostUnregister, ... were called.");
#endif
}
