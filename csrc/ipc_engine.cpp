#include "ipc_engine.h"

#include <unistd.h>

#include <cstring>

#include "cuda_check.h"

namespace hdrt {
namespace {

constexpr size_t kDoneMarks = 32;  // send tickets whose completion can be waited on exactly

// Makes `device` current for the scope and restores the caller's device (torch's) afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    HDRT_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) HDRT_CUDA_CHECK(cudaSetDevice(device));
    device_ = device;
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0, device_ = 0;
};

cudaEvent_t make_ipc_event() {
  cudaEvent_t e;
  HDRT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventInterprocess));
  return e;
}

cudaEvent_t make_local_event() {
  cudaEvent_t e;
  HDRT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

std::string event_handle_bytes(cudaEvent_t e) {
  cudaIpcEventHandle_t h;
  HDRT_CUDA_CHECK(cudaIpcGetEventHandle(&h, e));
  static_assert(sizeof(h) == kIpcHandleBytes, "unexpected cudaIpcEventHandle_t size");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

cudaEvent_t open_event_handle(const std::string& bytes) {
  cudaIpcEventHandle_t h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  cudaEvent_t e;
  HDRT_CUDA_CHECK(cudaIpcOpenEventHandle(&e, h));
  return e;
}

std::string channel_label(int src, int dst) {
  return "channel rank " + std::to_string(src) + " -> rank " + std::to_string(dst);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Construction: allocate what this rank exports.

Engine::Engine(const EngineConfig& cfg) : cfg_(cfg), pid_(getpid()) {
  if (cfg_.world_size < 1 || cfg_.rank < 0 || cfg_.rank >= cfg_.world_size)
    throw ProtocolError("rank " + std::to_string(cfg_.rank) + " outside world size " +
                        std::to_string(cfg_.world_size));
  if (static_cast<int>(cfg_.staging.size()) != cfg_.world_size)
    throw ProtocolError("staging must list one entry per rank");
  if (cfg_.num_slots < 2)
    throw ProtocolError("num_slots must be at least 2 (one slot cannot overlap send and receive)");
  check_shm_name(cfg_.shm_prefix + "_s0_r0");
  DeviceGuard guard(cfg_.device);
  HDRT_CUDA_CHECK(cudaFree(nullptr));  // create the context now, so failures surface here
  tx_.resize(cfg_.world_size);
  rx_.resize(cfg_.world_size);
  try {
    for (int peer = 0; peer < cfg_.world_size; ++peer) {
      if (peer == cfg_.rank) continue;
      const Staging staging = cfg_.staging[peer] == 1 ? Staging::kHost : Staging::kDevice;
      // Receive side: the ring segment, the slots, the free events.
      auto r = std::make_unique<RecvChannel>();
      r->src = peer;
      r->staging = staging;
      r->policy.timeout_ms = cfg_.timeout_ms;
      const bool host = staging == Staging::kHost;
      const std::string name = cfg_.shm_prefix + "_s" + std::to_string(peer) + "_r" +
                               std::to_string(cfg_.rank);
      r->shm = ShmRegion::create(name, ring_segment_bytes(cfg_.num_slots, cfg_.slot_bytes, host));
      ring_init(r->shm.data(), cfg_.num_slots, cfg_.slot_bytes, host, peer, cfg_.rank);
      r->rx.ctl = static_cast<RingControl*>(r->shm.data());
      r->rx.label = channel_label(peer, cfg_.rank);
      r->rx.attach(pid_);
      if (host) {
        r->slots = static_cast<char*>(r->shm.data()) + r->rx.ctl->data_offset;
        HDRT_CUDA_CHECK(cudaHostRegister(r->slots, uint64_t(cfg_.num_slots) * cfg_.slot_bytes,
                                         cudaHostRegisterPortable));
        r->host_registered = true;
      } else {
        void* p = nullptr;
        HDRT_CUDA_CHECK(cudaMalloc(&p, uint64_t(cfg_.num_slots) * cfg_.slot_bytes));
        r->slots = static_cast<char*>(p);
      }
      for (uint32_t s = 0; s < cfg_.num_slots; ++s) r->free_events.push_back(make_ipc_event());
      rx_[peer] = std::move(r);
      // Send side: full events, copy stream, completion marks.
      auto t = std::make_unique<SendChannel>();
      t->dst = peer;
      t->staging = staging;
      t->policy.timeout_ms = cfg_.timeout_ms;
      for (uint32_t s = 0; s < cfg_.num_slots; ++s) t->full_events.push_back(make_ipc_event());
      int lo = 0, hi = 0;
      HDRT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
      HDRT_CUDA_CHECK(cudaStreamCreateWithPriority(&t->stream, cudaStreamNonBlocking, hi));
      t->done.resize(kDoneMarks);
      for (auto& d : t->done) d.event = make_local_event();
      tx_[peer] = std::move(t);
    }
  } catch (...) {
    close();
    throw;
  }
}

Engine::~Engine() {
  try {
    close();
  } catch (...) {
  }
}

std::string Engine::export_handles() const {
  DeviceGuard guard(cfg_.device);
  std::vector<ChannelExport> out;
  for (int peer = 0; peer < cfg_.world_size; ++peer) {
    if (peer == cfg_.rank) continue;
    const RecvChannel& r = *rx_[peer];
    ChannelExport recv_side;
    recv_side.src_rank = peer;
    recv_side.dst_rank = cfg_.rank;
    recv_side.side = Side::kReceiver;
    recv_side.staging = r.staging;
    recv_side.num_slots = cfg_.num_slots;
    recv_side.slot_bytes = cfg_.slot_bytes;
    recv_side.pid = pid_;
    recv_side.shm_name = r.shm.name();
    if (r.staging == Staging::kDevice) {
      cudaIpcMemHandle_t h;
      HDRT_CUDA_CHECK(cudaIpcGetMemHandle(&h, r.slots));
      recv_side.mem_handle.assign(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    for (cudaEvent_t e : r.free_events) recv_side.event_handles.push_back(event_handle_bytes(e));
    out.push_back(std::move(recv_side));

    const SendChannel& t = *tx_[peer];
    ChannelExport send_side;
    send_side.src_rank = cfg_.rank;
    send_side.dst_rank = peer;
    send_side.side = Side::kSender;
    send_side.staging = t.staging;
    send_side.num_slots = cfg_.num_slots;
    send_side.slot_bytes = cfg_.slot_bytes;
    send_side.pid = pid_;
    for (cudaEvent_t e : t.full_events) send_side.event_handles.push_back(event_handle_bytes(e));
    out.push_back(std::move(send_side));
  }
  return encode_exports(out);
}

void Engine::connect(int peer, const std::string& blob, bool check_pid) {
  if (closed_) throw ProtocolError("connect() on a closed engine");
  if (peer < 0 || peer >= cfg_.world_size || peer == cfg_.rank)
    throw ProtocolError("connect(): invalid peer rank " + std::to_string(peer));
  SendChannel& t = *tx_[peer];
  RecvChannel& r = *rx_[peer];
  if (t.connected) throw ProtocolError("rank " + std::to_string(peer) + " is already connected");
  const ChannelExport* recv_side = nullptr;  // peer receives from me: its slots
  const ChannelExport* send_side = nullptr;  // peer sends to me: its full events
  auto entries = decode_exports(blob);
  for (const auto& e : entries) {
    if (e.side == Side::kReceiver && e.src_rank == cfg_.rank && e.dst_rank == peer) recv_side = &e;
    if (e.side == Side::kSender && e.src_rank == peer && e.dst_rank == cfg_.rank) send_side = &e;
  }
  if (!recv_side || !send_side)
    throw ProtocolError("rank " + std::to_string(peer) + "'s handles lack the channels to/from rank " +
                        std::to_string(cfg_.rank) + " (world sizes differ?)");
  for (const ChannelExport* e : {recv_side, send_side}) {
    if (e->num_slots != cfg_.num_slots || e->slot_bytes != cfg_.slot_bytes ||
        e->staging != t.staging || e->event_handles.size() != cfg_.num_slots)
      throw ProtocolError("rank " + std::to_string(peer) + " uses a different ring (" +
                          std::to_string(e->num_slots) + " slots of " +
                          std::to_string(e->slot_bytes) + " B, staging " +
                          (e->staging == Staging::kHost ? "host" : "device") + ") than rank " +
                          std::to_string(cfg_.rank) + " (" + std::to_string(cfg_.num_slots) +
                          " slots of " + std::to_string(cfg_.slot_bytes) + " B, staging " +
                          (t.staging == Staging::kHost ? "host" : "device") +
                          "); pass the same settings on every rank");
    if (e->pid == pid_)
      throw ProtocolError("rank " + std::to_string(peer) + " runs in this same process; CUDA IPC "
                          "needs one process per rank");
  }
  DeviceGuard guard(cfg_.device);
  // Outgoing channel: open the peer's segment, slots and free events.
  t.shm = ShmRegion::open(recv_side->shm_name);
  t.tx.ctl = ring_attach(t.shm.data(), t.shm.size(), recv_side->shm_name);
  t.tx.label = channel_label(cfg_.rank, peer);
  if (t.tx.ctl->num_slots != cfg_.num_slots || t.tx.ctl->slot_bytes != cfg_.slot_bytes)
    throw ProtocolError(t.tx.label + ": the shared ring's geometry differs from the handles");
  t.tx.attach(pid_);
  if (t.staging == Staging::kHost) {
    if (t.tx.ctl->data_offset == 0 ||
        t.shm.size() < t.tx.ctl->data_offset + uint64_t(cfg_.num_slots) * cfg_.slot_bytes)
      throw ProtocolError(t.tx.label + ": host staging segment has no data area");
    t.slots = static_cast<char*>(t.shm.data()) + t.tx.ctl->data_offset;
    HDRT_CUDA_CHECK(cudaHostRegister(t.slots, uint64_t(cfg_.num_slots) * cfg_.slot_bytes,
                                     cudaHostRegisterPortable));
    t.host_registered = true;
  } else {
    cudaIpcMemHandle_t h;
    std::memcpy(&h, recv_side->mem_handle.data(), sizeof(h));
    void* p = nullptr;
    HDRT_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    t.slots = static_cast<char*>(p);
    t.mem_opened = true;
  }
  for (const auto& h : recv_side->event_handles) t.free_events.push_back(open_event_handle(h));
  t.policy.check_pid = check_pid;
  // Incoming channel: the peer's full events.
  for (const auto& h : send_side->event_handles) r.full_events.push_back(open_event_handle(h));
  r.policy.check_pid = check_pid;
  r.connected = true;
  t.connected = true;
  t.worker = std::thread(&Engine::worker_loop, this, &t);
}

void Engine::unlink_shm() {
  for (auto& r : rx_)
    if (r) r->shm.unlink();
}

Engine::SendChannel& Engine::send_channel(int dst) {
  if (closed_) throw ProtocolError("the IPC engine is closed");
  if (dst < 0 || dst >= cfg_.world_size || dst == cfg_.rank || !tx_[dst])
    throw ProtocolError("invalid destination rank " + std::to_string(dst));
  if (!tx_[dst]->connected) throw ProtocolError("rank " + std::to_string(dst) + " is not connected");
  return *tx_[dst];
}

Engine::RecvChannel& Engine::recv_channel(int src) {
  if (closed_) throw ProtocolError("the IPC engine is closed");
  if (src < 0 || src >= cfg_.world_size || src == cfg_.rank || !rx_[src])
    throw ProtocolError("invalid source rank " + std::to_string(src));
  RecvChannel& r = *rx_[src];
  if (!r.connected) throw ProtocolError("rank " + std::to_string(src) + " is not connected");
  if (r.failed) throw ProtocolError(r.rx.label + " failed earlier: " + r.failure);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Sending

uint64_t Engine::send(int dst, const std::vector<TensorRef>& tensors, const std::string& what,
                      uintptr_t stream) {
  SendChannel& ch = send_channel(dst);
  std::vector<TensorSpec> specs;
  for (const auto& t : tensors) {
    if (t.ptr == 0 && t.spec.nbytes > 0) throw ProtocolError("send(): null data pointer");
    specs.push_back(t.spec);
  }
  const size_t chunks = make_plan(specs, cfg_.slot_bytes).chunks.size();  // validates, too
  if (ch.peer_gone.load())
    throw PeerExited(ch.tx.label + ": the peer exited or closed its end; '" + what + "' not sent");
  DeviceGuard guard(cfg_.device);
  cudaEvent_t ready = nullptr;
  {
    std::lock_guard<std::mutex> lk(ch.mu);
    if (ch.error) std::rethrow_exception(ch.error);
    if (!ch.ready_pool.empty()) {
      ready = ch.ready_pool.back();
      ch.ready_pool.pop_back();
    }
  }
  if (!ready) ready = make_local_event();
  HDRT_CUDA_CHECK(cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(stream)));
  std::unique_lock<std::mutex> lk(ch.mu);
  const uint64_t ticket = ch.next_ticket++;
  SendJob job{ticket, tensors, what, ready};
  // Fast path: nothing queued and the ring has room, so issuing cannot block: do it here and
  // save the hand-off to the worker thread.
  if (ch.queue.empty() && !ch.busy && !ch.error && ring_has_room(ch, chunks)) {
    ch.busy = true;
    lk.unlock();
    try {
      process_job(ch, job);
    } catch (...) {
      fail_send_channel(ch, std::current_exception(), job);
      throw;
    }
    lk.lock();
    ch.busy = false;
    lk.unlock();
    ch.cv.notify_all();
    return ticket;
  }
  ch.queue.push_back(std::move(job));
  lk.unlock();
  ch.cv.notify_all();
  return ticket;
}

bool Engine::ring_has_room(const SendChannel& ch, size_t chunks) const {
  const uint64_t last = ch.tx.next_seq + chunks - 1;
  return last <= cfg_.num_slots ||
         ch.tx.ctl->released.v.load(std::memory_order_acquire) >= last - cfg_.num_slots;
}

void Engine::fail_send_channel(SendChannel& ch, std::exception_ptr err, SendJob& job) {
  std::string text = "send failed";
  bool gone = false;
  try {
    std::rethrow_exception(err);
  } catch (const PeerExited& e) {
    text = e.what();
    gone = true;
  } catch (const std::exception& e) {
    text = e.what();
  } catch (...) {
  }
  if (gone) ch.peer_gone = true;
  if (ch.tx.ctl) ring_set_error(ch.tx.ctl, kSenderFailed, ch.tx.label + ": " + text);
  {
    std::lock_guard<std::mutex> lk(ch.mu);
    ch.busy = false;
    if (!ch.error) ch.error = err;
    if (job.ready) ch.ready_pool.push_back(job.ready);
    job.ready = nullptr;
  }
  ch.cv.notify_all();
}

void Engine::worker_loop(SendChannel* chp) {
  SendChannel& ch = *chp;
  bool device_ok = cudaSetDevice(cfg_.device) == cudaSuccess;
  ch.policy.poll = [chp] {
    std::lock_guard<std::mutex> lk(chp->mu);
    if (chp->stopping) throw PeerTimeout(chp->tx.label + ": the engine is closing");
  };
  for (;;) {
    SendJob job;
    {
      std::unique_lock<std::mutex> lk(ch.mu);
      ch.cv.wait(lk, [&] {
        return (!ch.queue.empty() && !ch.busy) || (ch.stopping && ch.queue.empty());
      });
      if (ch.queue.empty()) return;  // stopping
      job = std::move(ch.queue.front());
      ch.queue.pop_front();
      if (ch.error) {  // a failed channel drops the rest
        ch.ready_pool.push_back(job.ready);
        continue;
      }
      ch.busy = true;
    }
    try {
      if (!device_ok) HDRT_CUDA_CHECK(cudaSetDevice(cfg_.device));
      process_job(ch, job);
      {
        std::lock_guard<std::mutex> lk(ch.mu);
        ch.busy = false;
      }
      ch.cv.notify_all();
    } catch (...) {
      fail_send_channel(ch, std::current_exception(), job);
    }
  }
}

void Engine::process_job(SendChannel& ch, SendJob& job) {
  std::vector<TensorSpec> specs;
  for (const auto& t : job.tensors) specs.push_back(t.spec);
  const Plan plan = make_plan(specs, cfg_.slot_bytes);
  // The copies start after the producer's work that was on its stream at send() time.
  HDRT_CUDA_CHECK(cudaStreamWaitEvent(ch.stream, job.ready, 0));
  {
    std::lock_guard<std::mutex> lk(ch.mu);
    ch.ready_pool.push_back(job.ready);  // the wait above captured it; it may be re-recorded
  }
  job.ready = nullptr;
  const uint64_t msg = ch.tx.next_msg;
  for (uint32_t c = 0; c < plan.chunks.size(); ++c) {
    if (ch.peer_gone.load())
      throw PeerExited(ch.tx.label + ": the peer exited or closed its end");
    const uint64_t seq = ch.tx.next_seq;
    const uint32_t slot = ch.tx.acquire(seq, ch.policy);  // host wait: released >= seq - N
    if (seq > cfg_.num_slots)  // device wait: the receiver's stream finished reading the slot
      HDRT_CUDA_CHECK(cudaStreamWaitEvent(ch.stream, ch.free_events[slot], 0));
    SlotHeader& h = ch.tx.header(slot);
    h.seq = seq;
    fill_desc(h.desc, specs, plan, msg, c, job.what);
    char* base = slot_ptr(ch.slots, slot);
    for (const Segment& s : plan.chunks[c].segments)
      HDRT_CUDA_CHECK(cudaMemcpyAsync(base + s.slot_offset,
                                      reinterpret_cast<const char*>(job.tensors[s.tensor].ptr) +
                                          s.tensor_offset,
                                      s.bytes, cudaMemcpyDefault, ch.stream));
    HDRT_CUDA_CHECK(cudaEventRecord(ch.full_events[slot], ch.stream));
    ch.tx.post(seq);  // the receiver may now wait on full_events[slot]
    ch.tx.next_seq = seq + 1;
  }
  ch.tx.next_msg = msg + 1;
  // Completion mark for wait_sent(). Reusing a mark first proves its older ticket finished.
  DoneMark& mark = ch.done[job.ticket % kDoneMarks];
  uint64_t old;
  {
    std::lock_guard<std::mutex> lk(ch.mu);
    old = mark.ticket;
  }
  if (old != 0) HDRT_CUDA_CHECK(cudaEventSynchronize(mark.event));
  std::lock_guard<std::mutex> lk(ch.mu);
  mark.ticket = 0;
  HDRT_CUDA_CHECK(cudaEventRecord(mark.event, ch.stream));
  mark.ticket = job.ticket;
  ch.done_ticket = job.ticket;
  ch.bytes_sent += plan.payload_bytes;
}

void Engine::wait_sent(int dst, uint64_t ticket, uintptr_t stream,
                       const std::function<void()>& poll) {
  SendChannel& ch = send_channel(dst);
  std::unique_lock<std::mutex> lk(ch.mu);
  if (ticket == 0 || ticket >= ch.next_ticket)
    throw ProtocolError("wait_sent(): unknown ticket " + std::to_string(ticket));
  while (ch.done_ticket < ticket) {
    if (ch.error) std::rethrow_exception(ch.error);
    ch.cv.wait_for(lk, std::chrono::milliseconds(20));
    if (ch.done_ticket < ticket && poll) {
      lk.unlock();
      poll();
      lk.lock();
    }
  }
  const DoneMark& mark = ch.done[ticket % kDoneMarks];
  if (mark.ticket == ticket) {
    DeviceGuard guard(cfg_.device);
    HDRT_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), mark.event, 0));
  }  // else the mark was reused, which the worker does only after the ticket's copies finished
}

// ---------------------------------------------------------------------------------------------
// Receiving

uint32_t Engine::recv_chunk(RecvChannel& ch, const Plan& plan,
                            const std::vector<TensorSpec>& specs, uint64_t msg, uint32_t c,
                            const std::string& what, cudaStream_t stream) {
  const uint64_t seq = ch.rx.next_seq;
  const uint32_t slot = ch.rx.wait_posted(seq, ch.policy, what);  // host wait: posted >= seq
  std::string why = desc_mismatch(ch.rx.header(slot).desc, specs, plan, msg, c);
  if (!why.empty()) {
    ch.failed = true;
    ch.failure = why;
    ch.rx.refuse(slot, seq, why, what);
  }
  // The sender recorded full_events[slot] before posting seq and re-records it only after we
  // release seq, so this wait refers to exactly the copy of seq.
  HDRT_CUDA_CHECK(cudaStreamWaitEvent(stream, ch.full_events[slot], 0));
  return slot;
}

void Engine::fail_recv_channel(RecvChannel& ch, const std::exception& e, bool mid_message) {
  if (dynamic_cast<const PeerExited*>(&e)) {
    if (tx_[ch.src]) tx_[ch.src]->peer_gone = true;  // do not write into a dead peer's slots
    return;
  }
  if (ch.failed) return;  // only the first failure is recorded
  if (dynamic_cast<const PeerTimeout*>(&e)) {
    // Before the first chunk nothing changed: the caller may wait again. After part of a
    // message was consumed no clean retry is possible, so the channel fails (locally only).
    if (mid_message) {
      ch.failed = true;
      ch.failure = e.what();
    }
    return;
  }
  ch.failed = true;
  ch.failure = e.what();
  ring_set_error(ch.rx.ctl, kReceiverFailed, ch.rx.label + ": " + e.what());
}

void Engine::recv(int src, const std::vector<TensorRef>& dsts, const std::string& what,
                  uintptr_t stream_handle, const std::function<void()>& poll) {
  RecvChannel& ch = recv_channel(src);
  if (ch.view_seq)
    throw ProtocolError(ch.rx.label + ": recv() while a zero-copy view is held; release it first");
  std::vector<TensorSpec> specs;
  for (const auto& t : dsts) {
    if (t.ptr == 0 && t.spec.nbytes > 0) throw ProtocolError("recv(): null data pointer");
    specs.push_back(t.spec);
  }
  const Plan plan = make_plan(specs, cfg_.slot_bytes);
  DeviceGuard guard(cfg_.device);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  ch.policy.poll = poll;
  const uint64_t msg = ch.rx.next_msg;
  uint32_t consumed = 0;  // chunks of this message already released
  try {
    for (uint32_t c = 0; c < plan.chunks.size(); ++c, ++consumed) {
      const uint32_t slot = recv_chunk(ch, plan, specs, msg, c, what, stream);
      const char* base = slot_ptr(ch.slots, slot);
      for (const Segment& s : plan.chunks[c].segments)
        HDRT_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<char*>(dsts[s.tensor].ptr) + s.tensor_offset,
                                        base + s.slot_offset, s.bytes, cudaMemcpyDefault, stream));
      HDRT_CUDA_CHECK(cudaEventRecord(ch.free_events[slot], stream));
      ch.rx.release(ch.rx.next_seq);  // the sender may wait on free_events[slot] now
      ch.rx.next_seq += 1;
    }
  } catch (const std::exception& e) {
    fail_recv_channel(ch, e, consumed > 0);
    throw;
  }
  ch.rx.next_msg = msg + 1;
}

std::vector<uintptr_t> Engine::recv_view(int src, const std::vector<TensorSpec>& specs,
                                         const std::string& what, uintptr_t stream_handle,
                                         const std::function<void()>& poll) {
  RecvChannel& ch = recv_channel(src);
  if (ch.view_seq)
    throw ProtocolError(ch.rx.label + ": a zero-copy view is already held; release it first");
  if (ch.staging != Staging::kDevice)
    throw ProtocolError(ch.rx.label + ": zero-copy views need device staging (this channel "
                        "stages through host memory); use recv()");
  const Plan plan = make_plan(specs, cfg_.slot_bytes);
  if (plan.chunks.size() != 1)
    throw ProtocolError(ch.rx.label + ": a zero-copy view needs the message (" +
                        std::to_string(plan.total_bytes) + " B) to fit one slot (" +
                        std::to_string(cfg_.slot_bytes) + " B); use recv() or larger slots");
  DeviceGuard guard(cfg_.device);
  ch.policy.poll = poll;
  const uint64_t msg = ch.rx.next_msg;
  uint32_t slot;
  try {
    slot = recv_chunk(ch, plan, specs, msg, 0, what, reinterpret_cast<cudaStream_t>(stream_handle));
  } catch (const std::exception& e) {
    fail_recv_channel(ch, e, false);
    throw;
  }
  ch.view_seq = ch.rx.next_seq;
  ch.view_slot = slot;
  ch.rx.next_seq += 1;
  ch.rx.next_msg = msg + 1;
  std::vector<uintptr_t> out;
  for (uint64_t off : plan.tensor_offsets)
    out.push_back(reinterpret_cast<uintptr_t>(slot_ptr(ch.slots, slot) + off));
  return out;
}

void Engine::release_view(int src, uintptr_t stream_handle) {
  RecvChannel& ch = recv_channel(src);
  if (!ch.view_seq) throw ProtocolError(ch.rx.label + ": release_view() without a held view");
  DeviceGuard guard(cfg_.device);
  HDRT_CUDA_CHECK(cudaEventRecord(ch.free_events[ch.view_slot],
                                  reinterpret_cast<cudaStream_t>(stream_handle)));
  ch.rx.release(ch.view_seq);
  ch.view_seq = 0;
}

// ---------------------------------------------------------------------------------------------
// Introspection and shutdown

uintptr_t Engine::copy_stream(int dst) const {
  if (dst < 0 || dst >= cfg_.world_size || !tx_[dst]) throw ProtocolError("invalid rank");
  return reinterpret_cast<uintptr_t>(tx_[dst]->stream);
}

std::string Engine::staging(int peer) const {
  if (peer < 0 || peer >= cfg_.world_size || !tx_[peer]) throw ProtocolError("invalid rank");
  return tx_[peer]->staging == Staging::kHost ? "host" : "device";
}

uint64_t Engine::bytes_sent(int dst) const {
  if (dst < 0 || dst >= cfg_.world_size || !tx_[dst]) throw ProtocolError("invalid rank");
  std::lock_guard<std::mutex> lk(tx_[dst]->mu);
  return tx_[dst]->bytes_sent;
}

bool Engine::quiesce(int64_t timeout_ms) {
  const int64_t deadline = now_ns() + timeout_ms * 1000000LL;
  DeviceGuard guard(cfg_.device);
  for (auto& t : tx_) {
    if (!t || !t->connected) continue;
    for (;;) {  // the worker has issued everything
      {
        std::lock_guard<std::mutex> lk(t->mu);
        if ((t->queue.empty() && !t->busy) || t->error) break;
      }
      if (now_ns() > deadline) return false;
      usleep(200);
    }
    for (;;) {  // and the GPU has finished it
      cudaError_t e = cudaStreamQuery(t->stream);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) HDRT_CUDA_CHECK(e);
      if (now_ns() > deadline) return false;
      usleep(200);
    }
  }
  return true;
}

void Engine::close() {
  if (closed_) return;
  closed_ = true;
  for (auto& t : tx_) {
    if (!t) continue;
    {
      std::lock_guard<std::mutex> lk(t->mu);
      t->stopping = true;
    }
    t->cv.notify_all();
    if (t->worker.joinable()) t->worker.join();
  }
  // If a copy stream cannot drain (a dead peer never signals its events), leak the CUDA
  // resources rather than hang in cudaFree or cudaStreamDestroy.
  bool drained = true;
  int prev = 0;
  bool have_device = cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(cfg_.device) == cudaSuccess;
  if (have_device) {
    const int64_t deadline = now_ns() + std::min<int64_t>(cfg_.timeout_ms, 10000) * 1000000LL;
    for (auto& t : tx_) {
      if (!t || !t->stream) continue;
      while (cudaStreamQuery(t->stream) == cudaErrorNotReady) {
        if (now_ns() > deadline) {
          drained = false;
          break;
        }
        usleep(500);
      }
    }
  }
  for (auto& t : tx_)
    if (t && t->tx.ctl) t->tx.close();
  for (auto& r : rx_)
    if (r && r->rx.ctl) r->rx.close();
  if (have_device && drained && !leak_on_close_) {
    for (auto& t : tx_) {
      if (!t) continue;
      if (t->mem_opened) cudaIpcCloseMemHandle(t->slots);
      if (t->host_registered) cudaHostUnregister(t->slots);
      for (cudaEvent_t e : t->free_events) cudaEventDestroy(e);
      for (cudaEvent_t e : t->full_events) cudaEventDestroy(e);
      for (cudaEvent_t e : t->ready_pool) cudaEventDestroy(e);
      for (auto& d : t->done)
        if (d.event) cudaEventDestroy(d.event);
      if (t->stream) cudaStreamDestroy(t->stream);
    }
    for (auto& r : rx_) {
      if (!r) continue;
      if (r->host_registered) cudaHostUnregister(r->slots);
      else if (r->slots) cudaFree(r->slots);
      for (cudaEvent_t e : r->full_events) cudaEventDestroy(e);
      for (cudaEvent_t e : r->free_events) cudaEventDestroy(e);
    }
    cudaGetLastError();
  }
  if (have_device) cudaSetDevice(prev);
  for (auto& t : tx_) {
    if (!t) continue;
    if (drained) t->shm = ShmRegion();
    else new ShmRegion(std::move(t->shm));  // leaked: pending copies may still touch it
  }
  for (auto& r : rx_) {
    if (!r) continue;
    r->shm.unlink();
    if (drained) r->shm = ShmRegion();
    else new ShmRegion(std::move(r->shm));
  }
}

}  // namespace hdrt
