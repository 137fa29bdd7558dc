// Test hooks of the fake CUDA runtime (fake_cudart.cpp); bound as _C._fake_* in fake builds only.
#pragma once
#include <map>
#include <string>

namespace hdrt {
namespace fake {

// Stuck mode models a GPU whose streams wait forever (e.g. on the IPC event of a peer that died):
// cudaEventQuery answers cudaErrorNotReady and cudaEventSynchronize blocks until stuck mode ends;
// with `streams`, cudaStreamQuery answers cudaErrorNotReady too (else only a stream the engine
// does not own, e.g. a consumer's, is stuck: its events never complete). Per process.
void set_stuck(bool stuck, bool streams);
// How often resources were released: "cudaFree", "cudaHostUnregister", "cudaIpcCloseMemHandle",
// "cudaStreamDestroy", "cudaEventSynchronize".
std::map<std::string, long> counters();

}  // namespace fake
}  // namespace hdrt
