// Device queries that work in both builds: without CUDA compiled in they throw CudaUnavailable.
#pragma once
#include <cstdint>
#include <string>

namespace hdrt {

struct DeviceProps {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;
  uint64_t total_memory = 0;  // bytes
  int multiprocessors = 0;
  std::string uuid;           // 32 hex digits
  std::string pci_bus_id;     // e.g. "0000:3b:00.0"
  bool unified_addressing = false;
};

bool cuda_compiled();
int device_count();                         // throws CudaUnavailable when no driver/device
DeviceProps device_properties(int device);
bool can_access_peer(int device, int peer);  // cudaDeviceCanAccessPeer; true when device == peer
int runtime_version();                       // e.g. 13000; 0 without CUDA
int driver_version();                        // 0 when no driver

}  // namespace hdrt
