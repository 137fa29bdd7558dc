// pybind11 bindings of the CUDA transfer engine (compiled only with CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "cuda_check.h"
#include "ipc_engine.h"
#include "py_convert.h"

namespace py = pybind11;
using namespace hdrt;
using pyconv::check_python_signals;
using pyconv::refs_from;
using pyconv::specs_from;

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
      .def("send",
           [](Engine& e, int dst, const py::sequence& tensors, const std::string& what,
              uintptr_t stream) {
             auto refs = refs_from(tensors);
             py::gil_scoped_release nogil;
             return e.send(dst, refs, what, stream);
           },
           py::arg("dst"), py::arg("tensors"), py::arg("what"), py::arg("stream"))
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
}
