// Serialisation of what one rank exports to its peers once, at connection time: for each
// directed channel it takes part in, the shared-memory segment name, the CUDA IPC memory handle
// of the receive slots and the CUDA IPC event handles. Host-only: CUDA handles are opaque
// 64-byte strings here.
//
// Blob format (little endian): "HDRTHND1" | u32 version | u32 count | count entries | u64 FNV-1a
// of all preceding bytes. The decoder checks every length and the checksum.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace hdrt {

constexpr uint32_t kHandleVersion = 1;
constexpr size_t kIpcHandleBytes = 64;  // sizeof(cudaIpcMemHandle_t) == sizeof(cudaIpcEventHandle_t)

enum class Side : uint8_t { kSender = 0, kReceiver = 1 };
enum class Staging : uint8_t { kDevice = 0, kHost = 1 };

struct ChannelExport {
  int32_t src_rank = -1;
  int32_t dst_rank = -1;
  Side side = Side::kSender;         // who exported this entry
  Staging staging = Staging::kDevice;
  uint32_t num_slots = 0;
  uint64_t slot_bytes = 0;
  int32_t pid = 0;                   // exporting process
  std::string shm_name;              // receiver side: the ring's segment
  std::string mem_handle;            // receiver side, device staging: slots (64 bytes)
  std::vector<std::string> event_handles;  // sender: "full" events; receiver: "free" events
};

std::string encode_exports(const std::vector<ChannelExport>& entries);
std::vector<ChannelExport> decode_exports(const std::string& blob);

}  // namespace hdrt
