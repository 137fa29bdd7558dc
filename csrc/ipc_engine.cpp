#include "ipc_engine.h"

#include <unistd.h>

#include <cstring>

#include "cuda_check.h"

namespace hdrt {
namespace {

constexpr size_t kDoneMarks = 32;  // tickets whose completion can be waited on exactly
constexpr int64_t kNoLimitMs = 1000LL * 3600 * 24 * 365 * 50;  // "forever" (ns fit in int64)

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

enum class PollResult { kDone, kPeerGone, kTimedOut };

// After the peer is found dead, local GPU work still gets this long to finish (a peer that
// exited normally leaves nothing pending; one that died mid-copy never signals again).
constexpr int64_t kPeerGoneGraceNs = 500LL * 1000000LL;

// Poll `done()` until it holds, never blocking inside the CUDA driver: a short spin, then 50 us
// sleeps. About every 20 ms it checks that `peer_pid` still lives (when `check_pid`; a dead peer
// leaves kPeerGoneGraceNs) and calls `poll` (which may throw, e.g. when the engine is closing).
template <class Done>
PollResult poll_until(Done done, int64_t deadline_ns, int peer_pid, bool check_pid,
                      const std::function<void()>& poll) {
  int64_t next_check = 0;  // check liveness at the first miss
  bool peer_gone = false;
  for (uint32_t i = 0;; ++i) {
    if (done()) return PollResult::kDone;
    const int64_t t = now_ns();
    if (t >= next_check) {
      next_check = t + 20000000LL;
      if (!peer_gone && check_pid && peer_pid > 0 && !pid_alive(peer_pid)) {
        peer_gone = true;
        deadline_ns = std::min(deadline_ns, t + kPeerGoneGraceNs);
      }
      if (poll) poll();
    }
    if (t >= deadline_ns) {
      if (done()) return PollResult::kDone;
      return peer_gone ? PollResult::kPeerGone : PollResult::kTimedOut;
    }
    if (i < 64) {
      cpu_relax();
    } else {
      timespec ts{0, 50000};
      nanosleep(&ts, nullptr);
    }
  }
}

// cudaEventQuery as a bool; a failed query throws (CudaCallError naming the call).
bool event_done(cudaEvent_t e) {
  const cudaError_t r = cudaEventQuery(e);
  if (r == cudaErrorNotReady) return false;
  HDRT_CUDA_CHECK(r);
  return true;
}

// Shutdown variant: anything but "not ready" counts as done (a broken context will not drain).
bool event_settled(cudaEvent_t e) { return cudaEventQuery(e) != cudaErrorNotReady; }

int counter_pid(const PaddedCounter& c) { return static_cast<int>(c.v.load(std::memory_order_acquire)); }

// The specs of `tensors`, refusing null data pointers (`call` names the API in the error).
std::vector<TensorSpec> specs_of(const std::vector<TensorRef>& tensors, const char* call) {
  std::vector<TensorSpec> specs;
  for (const auto& t : tensors) {
    if (t.ptr == 0 && t.spec.nbytes > 0) throw ProtocolError(std::string(call) + ": null data pointer");
    specs.push_back(t.spec);
  }
  return specs;
}

// A job's "ready" event: a pooled (or new) local event recorded on the caller's `stream` now, so
// the job's copies start after the work queued there. Rethrows the channel's error first.
cudaEvent_t record_ready(std::mutex& mu, std::vector<cudaEvent_t>& pool,
                         const std::exception_ptr& error, uintptr_t stream) {
  cudaEvent_t ready = nullptr;
  {
    std::lock_guard<std::mutex> lk(mu);
    if (error) std::rethrow_exception(error);
    if (!pool.empty()) {
      ready = pool.back();
      pool.pop_back();
    }
  }
  if (!ready) ready = make_local_event();
  HDRT_CUDA_CHECK(cudaEventRecord(ready, reinterpret_cast<cudaStream_t>(stream)));
  return ready;
}

// The channel's stream waits for `job`'s ready event; the event goes back to the pool (the wait
// captured its record, so it may be re-recorded).
template <class Channel, class Job>
void start_after_ready(Channel& ch, Job& job) {
  HDRT_CUDA_CHECK(cudaStreamWaitEvent(ch.stream, job.ready, 0));
  std::lock_guard<std::mutex> lk(ch.mu);
  ch.ready_pool.push_back(job.ready);
  job.ready = nullptr;
}

template <class Channel, class Job>
bool take_job(Channel& ch, Job& job, const std::string& label, const char* done_verb);

// The channel's lock, once its worker is idle with nothing queued (waits up to 1 s, else
// ProtocolError naming `pending`).
template <class Channel>
std::unique_lock<std::mutex> lock_idle(Channel& ch, const std::string& label, const char* pending) {
  std::unique_lock<std::mutex> lk(ch.mu);
  if (!ch.cv.wait_for(lk, std::chrono::seconds(1), [&] { return !ch.busy && ch.queue.empty(); }))
    throw ProtocolError(label + ": set_timeout() while " + pending + "; wait for them first");
  return lk;
}

// The body of a channel's worker thread: on `device`, `process(job)` for every job take_job()
// hands out; `on_error(job)` runs inside the catch block when it throws.
template <class Channel, class Process, class OnError>
void run_worker(int device, Channel& ch, const std::string& label, const char* done_verb,
                Process process, OnError on_error) {
  const bool device_ok = cudaSetDevice(device) == cudaSuccess;
  typename decltype(ch.queue)::value_type job;
  while (take_job(ch, job, label, done_verb)) {
    try {
      if (!device_ok) HDRT_CUDA_CHECK(cudaSetDevice(device));
      process(job);
    } catch (...) {
      on_error(job);
    }
  }
}

// Take the next job of a channel's worker queue into `job` (blocking until there is one and no
// job is being issued inline, or until the channel stops). Jobs of a failed or closing channel are
// dropped (settled, their ready events pooled). False once stopping with nothing left.
template <class Channel, class Job>
bool take_job(Channel& ch, Job& job, const std::string& label, const char* done_verb) {
  std::unique_lock<std::mutex> lk(ch.mu);
  for (;;) {
    ch.cv.wait(lk, [&] { return (!ch.queue.empty() && !ch.busy) || (ch.stopping && ch.queue.empty()); });
    if (ch.queue.empty()) return false;  // stopping
    job = std::move(ch.queue.front());
    ch.queue.pop_front();
    if (!ch.error && !ch.stopping) {
      ch.busy = true;
      return true;
    }
    if (!ch.error)
      ch.error = std::make_exception_ptr(
          PeerTimeout(label + ": the engine closed before '" + job.what + "' was " + done_verb));
    ch.ready_pool.push_back(job.ready);
    ch.settled_ticket = job.ticket;
  }
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
      int lo = 0, hi = 0;
      HDRT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
      HDRT_CUDA_CHECK(cudaStreamCreateWithPriority(&r->stream, cudaStreamNonBlocking, hi));
      r->done.resize(kDoneMarks);
      for (auto& d : r->done) d.event = make_local_event();
      rx_[peer] = std::move(r);
      // Send side: full events, copy stream, completion marks.
      auto t = std::make_unique<SendChannel>();
      t->dst = peer;
      t->staging = staging;
      t->policy.timeout_ms = cfg_.timeout_ms;
      for (uint32_t s = 0; s < cfg_.num_slots; ++s) t->full_events.push_back(make_ipc_event());
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
  RecvChannel* rp = &r;
  r.rest_policy = r.policy;
  r.rest_policy.poll = [rp] {  // posted receives end when the engine closes
    std::lock_guard<std::mutex> lk(rp->mu);
    if (rp->stopping) throw PeerTimeout(rp->rx.label + ": the engine is closing");
  };
  r.first_policy = r.rest_policy;
  r.first_policy.timeout_ms = kNoLimitMs;  // the caller's wait_recv() has the limit
  r.connected = true;
  t.connected = true;
  r.worker = std::thread(&Engine::recv_worker_loop, this, &r);
  SendChannel* tp = &t;
  t.policy.poll = [tp] {  // waits of this channel's sends end when the engine closes
    std::lock_guard<std::mutex> lk(tp->mu);
    if (tp->stopping) throw PeerTimeout(tp->tx.label + ": the engine is closing");
  };
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
  const size_t chunks =  // validates, too
      make_plan(specs_of(tensors, "send()"), cfg_.slot_bytes).chunks.size();
  if (ch.peer_gone.load())
    throw PeerExited(ch.tx.label + ": the peer exited or closed its end; '" + what + "' not sent");
  DeviceGuard guard(cfg_.device);
  cudaEvent_t ready = record_ready(ch.mu, ch.ready_pool, ch.error, stream);
  std::unique_lock<std::mutex> lk(ch.mu);
  const uint64_t ticket = ch.next_ticket++;
  Job job{ticket, tensors, what, ready};
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

void Engine::fail_send_channel(SendChannel& ch, std::exception_ptr err, Job& job) {
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
    ch.settled_ticket = std::max(ch.settled_ticket, job.ticket);
    if (job.ready) ch.ready_pool.push_back(job.ready);
    job.ready = nullptr;
  }
  ch.cv.notify_all();
}

void Engine::worker_loop(SendChannel* chp) {
  SendChannel& ch = *chp;
  run_worker(
      cfg_.device, ch, ch.tx.label, "sent",
      [&](Job& job) {
        process_job(ch, job);
        {
          std::lock_guard<std::mutex> lk(ch.mu);
          ch.busy = false;
        }
        ch.cv.notify_all();
      },
      [&](Job& job) { fail_send_channel(ch, std::current_exception(), job); });
}

void Engine::process_job(SendChannel& ch, Job& job) {
  std::vector<TensorSpec> specs;
  for (const auto& t : job.tensors) specs.push_back(t.spec);
  const Plan plan = make_plan(specs, cfg_.slot_bytes);
  // The copies start after the producer's work that was on its stream at send() time.
  start_after_ready(ch, job);
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
  record_mark(ch.done, ch.mu, job.ticket, ch.stream, ch.policy,
              counter_pid(ch.tx.ctl->receiver_pid), ch.tx.label);
  std::lock_guard<std::mutex> lk(ch.mu);
  ch.done_ticket = job.ticket;
  ch.settled_ticket = job.ticket;
  ch.bytes_sent += plan.payload_bytes;
}

void Engine::record_mark(std::vector<DoneMark>& marks, std::mutex& mu, uint64_t ticket,
                         cudaStream_t stream, const WaitPolicy& policy, int peer_pid,
                         const std::string& label) {
  DoneMark& mark = marks[ticket % kDoneMarks];
  uint64_t old;
  {
    std::lock_guard<std::mutex> lk(mu);
    old = mark.ticket;
  }
  if (old != 0)  // bounded: a dead peer's events never fire, so neither would this mark
    wait_event(mark.event, policy, peer_pid,
               label + ": reusing the completion mark of ticket " + std::to_string(old) +
                   " for ticket " + std::to_string(ticket));
  std::lock_guard<std::mutex> lk(mu);
  mark.ticket = 0;
  HDRT_CUDA_CHECK(cudaEventRecord(mark.event, stream));
  mark.ticket = ticket;
}

void Engine::wait_event(cudaEvent_t event, const WaitPolicy& policy, int peer_pid,
                        const std::string& what) {
  const int64_t deadline = now_ns() + policy.timeout_ms * 1000000LL;
  switch (poll_until([&] { return event_done(event); }, deadline, peer_pid, policy.check_pid,
                     policy.poll)) {
    case PollResult::kDone:
      return;
    case PollResult::kPeerGone:
      throw PeerExited(what + ": the peer process (pid " + std::to_string(peer_pid) +
                       ") exited while copies to or from it were outstanding");
    case PollResult::kTimedOut:
      break;
  }
  throw PeerTimeout(what + ": the copies did not finish on the GPU within " +
                    std::to_string(policy.timeout_ms) +
                    " ms (the peer's stream may be stuck; raise timeout_s if it is only slow)");
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
                            const std::string& what, cudaStream_t stream,
                            const WaitPolicy& policy) {
  const uint64_t seq = ch.rx.next_seq;
  const uint32_t slot = ch.rx.wait_posted(seq, policy, what);  // host wait: posted >= seq
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

void Engine::check_no_posted(const RecvChannel& ch, const char* call) const {
  std::lock_guard<std::mutex> lk(ch.mu);
  if (!ch.queue.empty() || ch.busy)
    throw ProtocolError(ch.rx.label + ": " + call + " while posted receives are pending; wait "
                        "for them first");
}

void Engine::receive_message(RecvChannel& ch, const std::vector<TensorRef>& dsts,
                             const std::string& what, cudaStream_t stream,
                             const WaitPolicy& first, const WaitPolicy& rest) {
  const std::vector<TensorSpec> specs = specs_of(dsts, "recv()");
  const Plan plan = make_plan(specs, cfg_.slot_bytes);
  const uint64_t msg = ch.rx.next_msg;
  uint32_t consumed = 0;  // chunks of this message already released
  try {
    for (uint32_t c = 0; c < plan.chunks.size(); ++c, ++consumed) {
      const uint32_t slot =
          recv_chunk(ch, plan, specs, msg, c, what, stream, c == 0 ? first : rest);
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

void Engine::recv(int src, const std::vector<TensorRef>& dsts, const std::string& what,
                  uintptr_t stream_handle, const std::function<void()>& poll) {
  RecvChannel& ch = recv_channel(src);
  if (ch.view_seq)
    throw ProtocolError(ch.rx.label + ": recv() while a zero-copy view is held; release it first");
  check_no_posted(ch, "recv()");
  DeviceGuard guard(cfg_.device);
  ch.policy.poll = poll;
  receive_message(ch, dsts, what, reinterpret_cast<cudaStream_t>(stream_handle), ch.policy,
                  ch.policy);
}

uint64_t Engine::post_recv(int src, const std::vector<TensorRef>& dsts, const std::string& what,
                           uintptr_t stream) {
  RecvChannel& ch = recv_channel(src);
  if (ch.view_seq)
    throw ProtocolError(ch.rx.label + ": post_recv() while a zero-copy view is held; release it "
                        "first");
  make_plan(specs_of(dsts, "post_recv()"), cfg_.slot_bytes);  // validates now, not on the worker
  DeviceGuard guard(cfg_.device);
  // The receive stream writes the buffers only after the work the caller queued before (e.g.
  // the last use of the memory the caching allocator just handed out for them).
  cudaEvent_t ready = record_ready(ch.mu, ch.ready_pool, ch.error, stream);
  uint64_t ticket;
  {
    std::lock_guard<std::mutex> lk(ch.mu);
    ticket = ch.next_ticket++;
    ch.queue.push_back(Job{ticket, dsts, what, ready});
  }
  ch.cv.notify_all();
  return ticket;
}

void Engine::recv_worker_loop(RecvChannel* chp) {
  RecvChannel& ch = *chp;
  auto finish = [&](uint64_t ticket, bool ok) {
    {
      std::lock_guard<std::mutex> lk(ch.mu);
      ch.busy = false;
      if (ok) ch.done_ticket = ticket;
      else if (!ch.error) ch.error = std::current_exception();
      ch.settled_ticket = ticket;
    }
    ch.cv.notify_all();
  };
  run_worker(
      cfg_.device, ch, ch.rx.label, "received",
      [&](Job& job) {
        start_after_ready(ch, job);
        receive_message(ch, job.tensors, job.what, ch.stream, ch.first_policy, ch.rest_policy);
        record_mark(ch.done, ch.mu, job.ticket, ch.stream, ch.rest_policy,
                    counter_pid(ch.rx.ctl->sender_pid), ch.rx.label);
        finish(job.ticket, true);
      },
      [&](Job& job) {
        if (job.ready) {
          std::lock_guard<std::mutex> lk(ch.mu);
          ch.ready_pool.push_back(job.ready);
          job.ready = nullptr;
        }
        finish(job.ticket, false);
      });
}

void Engine::wait_recv(int src, uint64_t ticket, uintptr_t stream,
                       const std::function<void()>& poll) {
  if (closed_) throw ProtocolError("the IPC engine is closed");
  if (src < 0 || src >= cfg_.world_size || src == cfg_.rank || !rx_[src] || !rx_[src]->connected)
    throw ProtocolError("invalid source rank " + std::to_string(src));
  RecvChannel& ch = *rx_[src];
  std::unique_lock<std::mutex> lk(ch.mu);
  if (ticket == 0 || ticket >= ch.next_ticket)
    throw ProtocolError("wait_recv(): unknown ticket " + std::to_string(ticket));
  const int64_t limit_ms = ch.rest_policy.timeout_ms;
  const int64_t deadline = now_ns() + limit_ms * 1000000LL;
  while (ch.done_ticket < ticket) {
    // this ticket failed or was dropped (the worker drops the rest of a failed channel at once)
    if (ch.error && ch.settled_ticket >= ticket) std::rethrow_exception(ch.error);
    ch.cv.wait_for(lk, std::chrono::milliseconds(20));
    if (ch.done_ticket >= ticket) break;
    lk.unlock();
    if (poll) poll();
    lk.lock();
    if (ch.settled_ticket < ticket && now_ns() > deadline)
      throw PeerTimeout(ch.rx.label + ": posted receive " + std::to_string(ticket) +
                        " got no complete message within " + std::to_string(limit_ms) +
                        " ms (the peer may be stuck, dead, or running a different program; "
                        "raise timeout_s if it is only slow); it stays posted");
  }
  const DoneMark& mark = ch.done[ticket % kDoneMarks];
  if (mark.ticket == ticket) {
    DeviceGuard guard(cfg_.device);
    HDRT_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), mark.event, 0));
  }  // else the mark was reused, which the worker does only after the ticket's copies finished
}

uint64_t Engine::recv_settled(int src) const {
  if (src < 0 || src >= cfg_.world_size || !rx_[src]) throw ProtocolError("invalid rank");
  std::lock_guard<std::mutex> lk(rx_[src]->mu);
  return rx_[src]->settled_ticket;
}

std::vector<uintptr_t> Engine::recv_view(int src, const std::vector<TensorSpec>& specs,
                                         const std::string& what, uintptr_t stream_handle,
                                         const std::function<void()>& poll) {
  RecvChannel& ch = recv_channel(src);
  if (ch.view_seq)
    throw ProtocolError(ch.rx.label + ": a zero-copy view is already held; release it first");
  check_no_posted(ch, "recv_view()");
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
    slot = recv_chunk(ch, plan, specs, msg, 0, what, reinterpret_cast<cudaStream_t>(stream_handle),
                      ch.policy);
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

uintptr_t Engine::recv_stream(int src) const {
  if (src < 0 || src >= cfg_.world_size || !rx_[src]) throw ProtocolError("invalid rank");
  return reinterpret_cast<uintptr_t>(rx_[src]->stream);
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

uint64_t Engine::settled(int dst) const {
  if (dst < 0 || dst >= cfg_.world_size || !tx_[dst]) throw ProtocolError("invalid rank");
  std::lock_guard<std::mutex> lk(tx_[dst]->mu);
  return tx_[dst]->settled_ticket;
}

void Engine::set_timeout(int64_t timeout_ms) {
  if (timeout_ms <= 0)
    throw ProtocolError("timeout must be positive, got " + std::to_string(timeout_ms) + " ms");
  // The workers read the policies while they run a job: change them only while they are idle.
  for (auto& t : tx_) {
    if (!t) continue;
    auto lk = lock_idle(*t, t->tx.label, "sends are being issued");
    t->policy.timeout_ms = timeout_ms;
  }
  for (auto& r : rx_) {
    if (!r) continue;
    auto lk = lock_idle(*r, r->rx.label, "posted receives are pending");
    r->policy.timeout_ms = r->rest_policy.timeout_ms = timeout_ms;
  }
  cfg_.timeout_ms = timeout_ms;
}

void Engine::abort(const std::string& reason) {
  const std::string who = "rank " + std::to_string(cfg_.rank) + " aborted: " + reason;
  for (auto& t : tx_)
    if (t && t->tx.ctl) ring_set_error(t->tx.ctl, kSenderFailed, t->tx.label + ": " + who);
  for (auto& r : rx_)
    if (r && r->rx.ctl) ring_set_error(r->rx.ctl, kReceiverFailed, r->rx.label + ": " + who);
}

bool Engine::drain_send(SendChannel& ch, int64_t deadline_ns) {
  if (!ch.stream) return true;
  const int pid = ch.tx.ctl ? counter_pid(ch.tx.ctl->receiver_pid) : 0;
  return poll_until([&] { return cudaStreamQuery(ch.stream) != cudaErrorNotReady; }, deadline_ns,
                    pid, ch.policy.check_pid, nullptr) == PollResult::kDone;
}

bool Engine::drain_recv(RecvChannel& ch, int64_t deadline_ns) {
  if (ch.view_seq) return false;  // the caller may still read a zero-copy view of a slot
  // The copies out of the slots run on the consumers' streams; each records free[slot] after
  // them, so all free events done = nothing reads the slots any more.
  const int pid = ch.rx.ctl ? counter_pid(ch.rx.ctl->sender_pid) : 0;
  return poll_until(
             [&] {
               for (cudaEvent_t e : ch.free_events)
                 if (!event_settled(e)) return false;
               return true;
             },
             deadline_ns, pid, ch.policy.check_pid, nullptr) == PollResult::kDone;
}

bool Engine::quiesce(int64_t timeout_ms) {
  const int64_t deadline = now_ns() + timeout_ms * 1000000LL;
  DeviceGuard guard(cfg_.device);
  bool ok = true;
  for (auto& t : tx_) {
    if (!t || !t->connected) continue;
    SendChannel* tp = t.get();
    const bool issued =  // the worker has issued everything (or the channel failed)
        poll_until(
            [tp] {
              std::lock_guard<std::mutex> lk(tp->mu);
              return (tp->queue.empty() && !tp->busy) || tp->error;
            },
            deadline, counter_pid(t->tx.ctl->receiver_pid), t->policy.check_pid,
            nullptr) == PollResult::kDone;
    if (!issued || !drain_send(*t, deadline)) ok = false;  // and the GPU has finished it
  }
  return ok;
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
    if (t->worker.joinable()) t->worker.join();  // its waits poll `stopping`: it ends promptly
  }
  for (auto& r : rx_) {
    if (!r) continue;
    {
      std::lock_guard<std::mutex> lk(r->mu);
      r->stopping = true;
    }
    r->cv.notify_all();
    if (r->worker.joinable()) r->worker.join();
  }
  // Free nothing the GPU may still touch: the copy streams write into the peers' slots, and the
  // consumers' streams may still be copying out of this rank's slots. Both are drained with a
  // deadline (shortened when the peer is found dead); what does not drain is leaked, not freed.
  bool drained = true;
  int prev = 0;
  bool have_device = cudaGetDevice(&prev) == cudaSuccess && cudaSetDevice(cfg_.device) == cudaSuccess;
  if (have_device) {
    const int64_t deadline = now_ns() + std::min<int64_t>(cfg_.timeout_ms, 10000) * 1000000LL;
    for (auto& t : tx_)
      if (t && !drain_send(*t, deadline)) drained = false;
    for (auto& r : rx_)
      if (r && !drain_recv(*r, deadline)) drained = false;
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
      // The copy stream itself is kept: torch's caching allocator records events on it when
      // tensors that were sent (record_stream'ed on it) are freed later, possibly after close().
    }
    for (auto& r : rx_) {
      if (!r) continue;
      if (r->host_registered) cudaHostUnregister(r->slots);
      else if (r->slots) cudaFree(r->slots);
      for (cudaEvent_t e : r->full_events) cudaEventDestroy(e);
      for (cudaEvent_t e : r->free_events) cudaEventDestroy(e);
      for (cudaEvent_t e : r->ready_pool) cudaEventDestroy(e);
      for (auto& d : r->done)
        if (d.event) cudaEventDestroy(d.event);
      // The receive stream is kept, like the copy streams (buffers are record_stream'ed on it).
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
