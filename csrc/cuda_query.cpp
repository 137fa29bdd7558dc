#include "cuda_query.h"

#include "errors.h"

#ifdef HYBRIDIFF_RT_WITH_CUDA
#include <cstdio>

#include "cuda_check.h"
#endif

namespace hdrt {

#ifdef HYBRIDIFF_RT_WITH_CUDA

bool cuda_compiled() { return true; }

int device_count() {
  int n = 0;
  HDRT_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (n == 0)
    throw CudaUnavailable("cudaGetDeviceCount found no CUDA device; check CUDA_VISIBLE_DEVICES");
  return n;
}

static void check_index(int device) {
  int n = device_count();
  if (device < 0 || device >= n)
    throw CudaCallError("device index " + std::to_string(device) + " out of range: " +
                        std::to_string(n) + " device(s) visible");
}

DeviceProps device_properties(int device) {
  check_index(device);
  cudaDeviceProp p;
  HDRT_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceProps d;
  d.index = device;
  d.name = p.name;
  d.major = p.major;
  d.minor = p.minor;
  d.total_memory = p.totalGlobalMem;
  d.multiprocessors = p.multiProcessorCount;
  d.unified_addressing = p.unifiedAddressing != 0;
  char hex[40];
  for (int i = 0; i < 16; ++i)
    std::snprintf(hex + 2 * i, 3, "%02x", static_cast<unsigned char>(p.uuid.bytes[i]));
  d.uuid = hex;
  char bus[32];
  HDRT_CUDA_CHECK(cudaDeviceGetPCIBusId(bus, sizeof(bus), device));
  d.pci_bus_id = bus;
  return d;
}

bool can_access_peer(int device, int peer) {
  check_index(device);
  check_index(peer);
  if (device == peer) return true;
  int ok = 0;
  HDRT_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, device, peer));
  return ok != 0;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

#else  // host-only build

static const char* kNoCuda =
    "hybridiff_rt._C was built without CUDA (HYBRIDIFF_RT_CUDA=off, or no nvcc at build time); "
    "reinstall on a machine with a CUDA toolkit (`HYBRIDIFF_RT_CUDA=on pip install -e .`) or use "
    "transport='torch'";

bool cuda_compiled() { return false; }
int device_count() { throw CudaUnavailable(kNoCuda); }
DeviceProps device_properties(int) { throw CudaUnavailable(kNoCuda); }
bool can_access_peer(int, int) { throw CudaUnavailable(kNoCuda); }
int runtime_version() { return 0; }
int driver_version() { return 0; }

#endif

}  // namespace hdrt
