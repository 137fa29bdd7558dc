// Exception types thrown by the extension. bindings.cpp registers each as a Python exception
// class in hybridiff_rt._C (all derive from RuntimeError); hybridiff_rt/comm/ipc.py translates
// them into hybridiff_rt.errors types.
#pragma once
#include <stdexcept>
#include <string>

namespace hdrt {

// A peer exited, closed its end, or did not answer within the timeout.
struct PeerTimeout : std::runtime_error { using std::runtime_error::runtime_error; };
// The peer process exited or closed its end (a PeerTimeout that will not resolve by waiting).
struct PeerExited : PeerTimeout { using PeerTimeout::PeerTimeout; };
// Sender and receiver disagree on a message (count, sizes, dtypes, shapes, sequence).
struct MessageMismatch : std::runtime_error { using std::runtime_error::runtime_error; };
// No CUDA driver / no device / CUDA not compiled in.
struct CudaUnavailable : std::runtime_error { using std::runtime_error::runtime_error; };
// A CUDA runtime call failed; the message names the call.
struct CudaCallError : std::runtime_error { using std::runtime_error::runtime_error; };
// Shared state or a handle blob is corrupt or from an incompatible build; misuse of the API.
struct ProtocolError : std::runtime_error { using std::runtime_error::runtime_error; };

}  // namespace hdrt
