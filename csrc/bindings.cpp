// pybind11 bindings of hybridiff_rt._C. Only hybridiff_rt/comm/ipc.py imports this module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "cuda_query.h"
#include "errors.h"
#include "handles.h"
#include "host_ring.h"
#include "message.h"
#include "py_convert.h"

#ifdef HYBRIDIFF_RT_WITH_CUDA
#include "ipc_engine.h"
#endif

#ifndef HYBRIDIFF_RT_VERSION
#define HYBRIDIFF_RT_VERSION "unknown"
#endif

namespace py = pybind11;
using namespace hdrt;
using pyconv::check_python_signals;
using pyconv::specs_from;

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = HYBRIDIFF_RT_VERSION;
  d["cuda_compiled"] = cuda_compiled();
#ifdef HYBRIDIFF_RT_WITH_CUDA
  d["cuda_version"] = HYBRIDIFF_RT_CUDA_VERSION;
  py::list archs;
  std::string a = HYBRIDIFF_RT_CUDA_ARCHS;
  size_t start = 0;
  while (start <= a.size()) {
    size_t end = a.find(',', start);
    if (end == std::string::npos) end = a.size();
    if (end > start) archs.append(a.substr(start, end - start));
    start = end + 1;
  }
  d["archs"] = archs;
#ifdef HYBRIDIFF_RT_CUDART_SHARED
  d["cudart"] = "shared";
#else
  d["cudart"] = "static";
#endif
#else
  d["cuda_version"] = py::none();
  d["archs"] = py::list();
  d["cudart"] = py::none();
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                  std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  d["ring_protocol_version"] = kRingVersion;
  d["handle_version"] = kHandleVersion;
  return d;
}

py::dict props_dict(const DeviceProps& p) {
  py::dict d;
  d["index"] = p.index;
  d["name"] = p.name;
  d["capability"] = py::make_tuple(p.major, p.minor);
  d["total_memory"] = p.total_memory;
  d["multiprocessors"] = p.multiprocessors;
  d["uuid"] = p.uuid;
  d["pci_bus_id"] = p.pci_bus_id;
  d["unified_addressing"] = p.unified_addressing;
  return d;
}

py::dict export_to_dict(const ChannelExport& e) {
  py::dict d;
  d["src_rank"] = e.src_rank;
  d["dst_rank"] = e.dst_rank;
  d["side"] = e.side == Side::kSender ? "sender" : "receiver";
  d["staging"] = e.staging == Staging::kDevice ? "device" : "host";
  d["num_slots"] = e.num_slots;
  d["slot_bytes"] = e.slot_bytes;
  d["pid"] = e.pid;
  d["shm_name"] = e.shm_name;
  d["mem_handle"] = py::bytes(e.mem_handle);
  py::list ev;
  for (const auto& h : e.event_handles) ev.append(py::bytes(h));
  d["event_handles"] = ev;
  return d;
}

ChannelExport export_from_dict(const py::dict& d) {
  ChannelExport e;
  e.src_rank = d["src_rank"].cast<int32_t>();
  e.dst_rank = d["dst_rank"].cast<int32_t>();
  auto side = d["side"].cast<std::string>();
  auto staging = d["staging"].cast<std::string>();
  if (side != "sender" && side != "receiver") throw py::value_error("side must be 'sender' or 'receiver'");
  if (staging != "device" && staging != "host") throw py::value_error("staging must be 'device' or 'host'");
  e.side = side == "sender" ? Side::kSender : Side::kReceiver;
  e.staging = staging == "device" ? Staging::kDevice : Staging::kHost;
  e.num_slots = d["num_slots"].cast<uint32_t>();
  e.slot_bytes = d["slot_bytes"].cast<uint64_t>();
  e.pid = d["pid"].cast<int32_t>();
  e.shm_name = d["shm_name"].cast<std::string>();
  e.mem_handle = d["mem_handle"].cast<std::string>();
  for (auto h : d["event_handles"].cast<py::list>()) e.event_handles.push_back(h.cast<std::string>());
  return e;
}

HostRing::Role role_from(const std::string& role) {
  if (role == "sender") return HostRing::Role::kSender;
  if (role == "receiver") return HostRing::Role::kReceiver;
  throw py::value_error("role must be 'sender' or 'receiver', got '" + role + "'");
}

}  // namespace

#ifdef HYBRIDIFF_RT_WITH_CUDA
void bind_engine(py::module_& m);
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "hybridiff_rt native extension: CUDA IPC transfer engine and its host-side protocol";

  py::register_local_exception<PeerTimeout>(m, "PeerTimeout", PyExc_RuntimeError);
  py::register_local_exception<MessageMismatch>(m, "MessageMismatch", PyExc_RuntimeError);
  py::register_local_exception<CudaUnavailable>(m, "CudaUnavailable", PyExc_RuntimeError);
  py::register_local_exception<CudaCallError>(m, "CudaCallError", PyExc_RuntimeError);
  py::register_local_exception<ProtocolError>(m, "ProtocolError", PyExc_RuntimeError);

  m.attr("TENSOR_ALIGN") = kTensorAlign;
  m.attr("MAX_TENSORS") = kMaxTensors;
  m.attr("MAX_DIMS") = kMaxDims;

  m.def("build_info", &build_info,
        "dict: version, cuda_compiled, cuda_version (str | None), archs (list[str]), cudart, "
        "compiler, pybind11, ring_protocol_version, handle_version");
  m.def("cuda_compiled", &cuda_compiled);
  m.def("device_count", &device_count,
        "Number of visible CUDA devices; raises CudaUnavailable when there is no driver or device.");
  m.def("device_properties", [](int i) { return props_dict(device_properties(i)); }, py::arg("device"),
        "dict: index, name, capability, total_memory (bytes), multiprocessors, uuid, pci_bus_id, "
        "unified_addressing");
  m.def("can_access_peer", &can_access_peer, py::arg("device"), py::arg("peer"),
        "cudaDeviceCanAccessPeer(device, peer); True when device == peer.");
  m.def("runtime_version", &runtime_version);
  m.def("driver_version", &driver_version);

  m.def("pid_alive", &pid_alive, py::arg("pid"),
        "False once process `pid` is known to have exited (no such process, or a zombie).");
  m.def("ring_segment_bytes", &ring_segment_bytes, py::arg("num_slots"), py::arg("slot_bytes"),
        py::arg("with_data"),
        "Bytes of /dev/shm one channel's ring takes: its control block, plus num_slots * "
        "slot_bytes of slot data when with_data (host staging).");
  m.def("encode_exports",
        [](const py::list& entries) {
          std::vector<ChannelExport> v;
          for (auto e : entries) v.push_back(export_from_dict(e.cast<py::dict>()));
          return py::bytes(encode_exports(v));
        },
        "Serialise a list of channel-export dicts into a handle blob (bytes).");
  m.def("decode_exports",
        [](const py::bytes& blob) {
          py::list out;
          for (const auto& e : decode_exports(std::string(blob))) out.append(export_to_dict(e));
          return out;
        },
        "Parse a handle blob; raises ProtocolError when it is truncated, corrupt or from another "
        "version.");
  m.def("plan_message",
        [](const py::sequence& specs, uint64_t slot_bytes) {
          Plan p = make_plan(specs_from(specs), slot_bytes);
          py::dict d;
          d["tensor_offsets"] = p.tensor_offsets;
          d["total_bytes"] = p.total_bytes;
          d["payload_bytes"] = p.payload_bytes;
          py::list chunks;
          for (const auto& c : p.chunks) {
            py::list segs;
            for (const auto& s : c.segments)
              segs.append(py::make_tuple(s.tensor, s.tensor_offset, s.slot_offset, s.bytes));
            chunks.append(py::make_tuple(c.offset, c.bytes, segs));
          }
          d["chunks"] = chunks;
          return d;
        },
        py::arg("specs"), py::arg("slot_bytes"),
        "How a message of specs [(dtype, shape, nbytes), ...] is cut into slots: dict with "
        "tensor_offsets, total_bytes, payload_bytes, chunks [(offset, bytes, [(tensor, "
        "tensor_offset, slot_offset, bytes), ...])].");

  py::class_<HostRing>(m, "SlotRing", py::module_local(),
                       "One directed slot-ring channel in POSIX shared memory with host memcpy "
                       "copies: the CUDA engine's protocol, testable without a GPU.")
      .def_static(
          "create",
          [](const std::string& name, const std::string& role, uint32_t num_slots,
             uint64_t slot_bytes, int64_t timeout_ms) {
            return std::make_unique<HostRing>(name, role_from(role), num_slots, slot_bytes,
                                              timeout_ms);
          },
          py::arg("name"), py::arg("role"), py::arg("num_slots"), py::arg("slot_bytes"),
          py::arg("timeout_ms") = 30000)
      .def_static(
          "open",
          [](const std::string& name, const std::string& role, int64_t timeout_ms) {
            return std::make_unique<HostRing>(name, role_from(role), timeout_ms);
          },
          py::arg("name"), py::arg("role"), py::arg("timeout_ms") = 30000)
      .def(
          "send",
          [](HostRing& r, const py::sequence& tensors, const std::string& what) {
            std::vector<py::buffer_info> infos;
            std::vector<const char*> ptrs;
            std::vector<TensorSpec> specs;
            for (auto item : tensors) {
              auto t = item.cast<py::tuple>();
              if (t.size() != 3)
                throw py::value_error("send() takes [(dtype, shape, buffer), ...]");
              infos.push_back(t[2].cast<py::buffer>().request());
              TensorSpec s;
              s.dtype = t[0].cast<std::string>();
              s.shape = t[1].cast<std::vector<int64_t>>();
              s.nbytes = uint64_t(infos.back().size) * uint64_t(infos.back().itemsize);
              specs.push_back(s);
              ptrs.push_back(static_cast<const char*>(infos.back().ptr));
            }
            r.policy.poll = check_python_signals;
            py::gil_scoped_release nogil;
            return r.send(ptrs, specs, what);
          },
          py::arg("tensors"), py::arg("what") = "",
          "Send one message [(dtype, shape, buffer), ...]; returns the sequence numbers used.")
      .def(
          "recv",
          [](HostRing& r, const py::sequence& specs_in, const std::string& what, bool hold) {
            auto specs = specs_from(specs_in);
            py::list out;
            std::vector<char*> ptrs;
            for (const auto& s : specs) {
              py::object b = py::reinterpret_steal<py::object>(
                  PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(s.nbytes)));
              if (!b) throw py::error_already_set();
              ptrs.push_back(PyByteArray_AsString(b.ptr()));
              out.append(b);
            }
            r.policy.poll = check_python_signals;
            std::vector<uint64_t> seqs;
            {
              py::gil_scoped_release nogil;
              seqs = r.recv(ptrs, specs, what, hold);
            }
            return py::make_tuple(out, seqs);
          },
          py::arg("specs"), py::arg("what") = "", py::arg("hold") = false,
          "Receive the next message, which must match specs [(dtype, shape, nbytes), ...]; "
          "returns (list[bytearray], sequence numbers). hold=True keeps its slots until "
          "release_held().")
      .def("release_held", &HostRing::release_held)
      .def("slot_data", [](const HostRing& r, uint32_t slot) { return py::bytes(r.slot_data(slot)); })
      .def("_forge_slot_seq", &HostRing::forge_slot_seq, "Test hook: overwrite a slot header's seq.")
      .def("unlink", &HostRing::unlink)
      .def("close", &HostRing::close)
      .def_property_readonly("posted", &HostRing::posted)
      .def_property_readonly("released", &HostRing::released)
      .def_property_readonly("next_seq", &HostRing::next_seq)
      .def_property_readonly("num_slots", &HostRing::num_slots)
      .def_property_readonly("slot_bytes", &HostRing::slot_bytes)
      .def_property_readonly("name", &HostRing::name)
      .def_property(
          "timeout_ms", [](const HostRing& r) { return r.policy.timeout_ms; },
          [](HostRing& r, int64_t ms) { r.policy.timeout_ms = ms; })
      .def_property(
          "check_pid", [](const HostRing& r) { return r.policy.check_pid; },
          [](HostRing& r, bool v) { r.policy.check_pid = v; });

#ifdef HYBRIDIFF_RT_WITH_CUDA
  bind_engine(m);
#endif
}
