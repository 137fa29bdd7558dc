// HostRing: one directed slot-ring channel whose slot data also lives in the shared segment, with
// plain host memcpy as the "copy". It runs the exact protocol of the CUDA engine (slot_ring.h,
// message.h) without a GPU, so the protocol is unit-tested in CI from two processes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "message.h"
#include "shm_region.h"
#include "slot_ring.h"

namespace hdrt {

class HostRing {
 public:
  enum class Role { kSender, kReceiver };

  // Create the segment (either role may create; the other opens).
  HostRing(const std::string& name, Role role, uint32_t num_slots, uint64_t slot_bytes,
           int64_t timeout_ms);
  // Open an existing segment.
  HostRing(const std::string& name, Role role, int64_t timeout_ms);
  ~HostRing();

  // Sender: copy `data[i]` (spec[i].nbytes bytes each) into slots; returns the sequences used.
  std::vector<uint64_t> send(const std::vector<const char*>& data,
                             const std::vector<TensorSpec>& specs, const std::string& what);
  // Receiver: wait for the next message, check it matches `specs`, copy it into `out[i]`. With
  // hold, the message's slots stay unreleased until release_held() (a slow consumer).
  std::vector<uint64_t> recv(const std::vector<char*>& out, const std::vector<TensorSpec>& specs,
                             const std::string& what, bool hold);
  void release_held();
  std::string slot_data(uint32_t slot) const;  // raw copy of a slot's bytes
  void forge_slot_seq(uint32_t slot, uint64_t seq);  // test hook: corrupt a header's seq

  void unlink() { shm_.unlink(); }
  void close();
  uint64_t posted() const { return ctl()->posted.v.load(); }
  uint64_t released() const { return ctl()->released.v.load(); }
  uint64_t next_seq() const { return role_ == Role::kSender ? tx_.next_seq : rx_.next_seq; }
  uint32_t num_slots() const { return ctl()->num_slots; }
  uint64_t slot_bytes() const { return ctl()->slot_bytes; }
  const std::string& name() const { return shm_.name(); }

  WaitPolicy policy;

 private:
  RingControl* ctl() const { return static_cast<RingControl*>(shm_.data()); }
  char* slot_ptr(uint32_t slot) const;
  void attach();

  ShmRegion shm_;
  Role role_;
  RingSender tx_;
  RingReceiver rx_;
  std::vector<uint64_t> held_;
  bool closed_ = false;
};

}  // namespace hdrt
