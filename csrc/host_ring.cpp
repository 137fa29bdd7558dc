#include "host_ring.h"

#include <unistd.h>

#include <cstring>

namespace hdrt {

HostRing::HostRing(const std::string& name, Role role, uint32_t num_slots, uint64_t slot_bytes,
                   int64_t timeout_ms)
    : role_(role) {
  policy.timeout_ms = timeout_ms;
  if (slot_bytes < kTensorAlign || slot_bytes % kTensorAlign)
    throw ProtocolError("slot_bytes must be a positive multiple of 256, got " +
                        std::to_string(slot_bytes));
  shm_ = ShmRegion::create(name, ring_segment_bytes(num_slots, slot_bytes, true));
  ring_init(shm_.data(), num_slots, slot_bytes, true, 0, 1);
  attach();
}

HostRing::HostRing(const std::string& name, Role role, int64_t timeout_ms) : role_(role) {
  policy.timeout_ms = timeout_ms;
  shm_ = ShmRegion::open(name);
  RingControl* c = ring_attach(shm_.data(), shm_.size(), name);
  if (c->data_offset == 0 ||
      shm_.size() < c->data_offset + uint64_t(c->num_slots) * c->slot_bytes)
    throw ProtocolError("slot ring " + name + " has no host data area");
  attach();
}

void HostRing::attach() {
  const std::string label = "host ring " + shm_.name();
  if (role_ == Role::kSender) {
    tx_.ctl = ctl();
    tx_.label = label;
    tx_.attach(getpid());
  } else {
    rx_.ctl = ctl();
    rx_.label = label;
    rx_.attach(getpid());
  }
}

HostRing::~HostRing() {
  try {
    close();
  } catch (...) {
  }
}

void HostRing::close() {
  if (closed_ || !shm_.data()) return;
  closed_ = true;
  if (role_ == Role::kSender) tx_.close(); else rx_.close();
}

char* HostRing::slot_ptr(uint32_t slot) const {
  return static_cast<char*>(shm_.data()) + ctl()->data_offset + uint64_t(slot) * ctl()->slot_bytes;
}

std::vector<uint64_t> HostRing::send(const std::vector<const char*>& data,
                                     const std::vector<TensorSpec>& specs,
                                     const std::string& what) {
  if (role_ != Role::kSender) throw ProtocolError("send() on the receiving end of " + name());
  if (closed_) throw ProtocolError("send() on a closed ring " + name());
  Plan plan = make_plan(specs, ctl()->slot_bytes);
  const uint64_t msg = tx_.next_msg;
  std::vector<uint64_t> seqs;
  for (uint32_t c = 0; c < plan.chunks.size(); ++c) {
    const uint64_t seq = tx_.next_seq;
    const uint32_t slot = tx_.acquire(seq, policy);
    SlotHeader& h = tx_.header(slot);
    h.seq = seq;
    fill_desc(h.desc, specs, plan, msg, c, what);
    char* dst = slot_ptr(slot);
    for (const Segment& s : plan.chunks[c].segments)
      std::memcpy(dst + s.slot_offset, data[s.tensor] + s.tensor_offset, s.bytes);
    tx_.post(seq);
    tx_.next_seq = seq + 1;
    seqs.push_back(seq);
  }
  tx_.next_msg = msg + 1;
  return seqs;
}

std::vector<uint64_t> HostRing::recv(const std::vector<char*>& out,
                                     const std::vector<TensorSpec>& specs, const std::string& what,
                                     bool hold) {
  if (role_ != Role::kReceiver) throw ProtocolError("recv() on the sending end of " + name());
  if (closed_) throw ProtocolError("recv() on a closed ring " + name());
  if (!held_.empty())
    throw ProtocolError("recv() while a held message is unreleased; call release_held() first");
  Plan plan = make_plan(specs, ctl()->slot_bytes);
  const uint64_t msg = rx_.next_msg;
  std::vector<uint64_t> seqs;
  for (uint32_t c = 0; c < plan.chunks.size(); ++c) {
    const uint64_t seq = rx_.next_seq;
    const uint32_t slot = rx_.wait_posted(seq, policy, what);
    std::string why = desc_mismatch(rx_.header(slot).desc, specs, plan, msg, c);
    if (!why.empty()) rx_.refuse(slot, seq, why, what);
    const char* src = slot_ptr(slot);
    for (const Segment& s : plan.chunks[c].segments)
      std::memcpy(out[s.tensor] + s.tensor_offset, src + s.slot_offset, s.bytes);
    if (hold) held_.push_back(seq); else rx_.release(seq);
    rx_.next_seq = seq + 1;
    seqs.push_back(seq);
  }
  rx_.next_msg = msg + 1;
  return seqs;
}

void HostRing::release_held() {
  for (uint64_t seq : held_) rx_.release(seq);
  held_.clear();
}

std::string HostRing::slot_data(uint32_t slot) const {
  if (slot >= ctl()->num_slots) throw ProtocolError("slot index out of range");
  return std::string(slot_ptr(slot), ctl()->slot_bytes);
}

void HostRing::forge_slot_seq(uint32_t slot, uint64_t seq) {
  if (slot >= ctl()->num_slots) throw ProtocolError("slot index out of range");
  ring_slots(ctl())[slot].seq = seq;
}

}  // namespace hdrt
