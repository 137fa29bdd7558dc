#include "handles.h"

#include <cstring>

#include "errors.h"

namespace hdrt {
namespace {

constexpr char kMagic[8] = {'H', 'D', 'R', 'T', 'H', 'N', 'D', '1'};
constexpr uint32_t kMaxString = 1u << 16;
constexpr uint32_t kMaxEntries = 4096;
constexpr uint32_t kMaxEvents = 1024;

uint64_t fnv1a(const char* p, size_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= 1099511628211ULL;
  }
  return h;
}

struct Writer {
  std::string out;
  template <class T> void put(T v) {
    unsigned char b[sizeof(T)];
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    for (size_t i = 0; i < sizeof(T); ++i) b[i] = static_cast<unsigned char>(u >> (8 * i));
    out.append(reinterpret_cast<char*>(b), sizeof(T));
  }
  void str(const std::string& s) {
    if (s.size() > kMaxString) throw ProtocolError("handle field longer than 64 KiB");
    put<uint32_t>(static_cast<uint32_t>(s.size()));
    out += s;
  }
};

struct Reader {
  const std::string& in;
  size_t pos = 0;
  const char* field = "";
  void need(size_t n) {
    if (in.size() - pos < n)
      throw ProtocolError(std::string("handle blob truncated while reading ") + field + " (" +
                          std::to_string(in.size()) + " bytes in all)");
  }
  template <class T> T get(const char* name) {
    field = name;
    need(sizeof(T));
    uint64_t u = 0;
    for (size_t i = 0; i < sizeof(T); ++i)
      u |= uint64_t(static_cast<unsigned char>(in[pos + i])) << (8 * i);
    pos += sizeof(T);
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
  }
  std::string str(const char* name) {
    uint32_t n = get<uint32_t>(name);
    if (n > kMaxString) throw ProtocolError(std::string("handle field ") + name + " too long");
    need(n);
    std::string s = in.substr(pos, n);
    pos += n;
    return s;
  }
};

}  // namespace

std::string encode_exports(const std::vector<ChannelExport>& entries) {
  Writer w;
  w.out.append(kMagic, sizeof(kMagic));
  w.put<uint32_t>(kHandleVersion);
  w.put<uint32_t>(static_cast<uint32_t>(entries.size()));
  for (const auto& e : entries) {
    if (!e.mem_handle.empty() && e.mem_handle.size() != kIpcHandleBytes)
      throw ProtocolError("a CUDA IPC memory handle has 64 bytes, got " +
                          std::to_string(e.mem_handle.size()));
    w.put<int32_t>(e.src_rank);
    w.put<int32_t>(e.dst_rank);
    w.put<uint8_t>(static_cast<uint8_t>(e.side));
    w.put<uint8_t>(static_cast<uint8_t>(e.staging));
    w.put<uint16_t>(0);
    w.put<uint32_t>(e.num_slots);
    w.put<uint64_t>(e.slot_bytes);
    w.put<int32_t>(e.pid);
    w.str(e.shm_name);
    w.str(e.mem_handle);
    w.put<uint32_t>(static_cast<uint32_t>(e.event_handles.size()));
    for (const auto& h : e.event_handles) {
      if (h.size() != kIpcHandleBytes)
        throw ProtocolError("a CUDA IPC event handle has 64 bytes, got " + std::to_string(h.size()));
      w.str(h);
    }
  }
  w.put<uint64_t>(fnv1a(w.out.data(), w.out.size()));
  return w.out;
}

std::vector<ChannelExport> decode_exports(const std::string& blob) {
  if (blob.size() < sizeof(kMagic) + 16 || std::memcmp(blob.data(), kMagic, sizeof(kMagic)) != 0)
    throw ProtocolError("not a hybridiff_rt handle blob (bad magic, " + std::to_string(blob.size()) +
                        " bytes)");
  const size_t body = blob.size() - 8;
  uint64_t stored = 0;
  for (int i = 0; i < 8; ++i) stored |= uint64_t(static_cast<unsigned char>(blob[body + i])) << (8 * i);
  if (stored != fnv1a(blob.data(), body))
    throw ProtocolError("handle blob checksum mismatch: it was corrupted in transit");
  Reader r{blob};
  r.pos = sizeof(kMagic);
  uint32_t version = r.get<uint32_t>("version");
  if (version != kHandleVersion)
    throw ProtocolError("handle blob version " + std::to_string(version) + ", this build reads " +
                        std::to_string(kHandleVersion) + "; rebuild all ranks from one checkout");
  uint32_t count = r.get<uint32_t>("entry count");
  if (count > kMaxEntries) throw ProtocolError("handle blob claims too many entries");
  std::vector<ChannelExport> out;
  for (uint32_t i = 0; i < count; ++i) {
    ChannelExport e;
    e.src_rank = r.get<int32_t>("src_rank");
    e.dst_rank = r.get<int32_t>("dst_rank");
    uint8_t side = r.get<uint8_t>("side"), staging = r.get<uint8_t>("staging");
    if (side > 1 || staging > 1) throw ProtocolError("handle blob has an invalid side/staging");
    e.side = static_cast<Side>(side);
    e.staging = static_cast<Staging>(staging);
    r.get<uint16_t>("reserved");
    e.num_slots = r.get<uint32_t>("num_slots");
    e.slot_bytes = r.get<uint64_t>("slot_bytes");
    e.pid = r.get<int32_t>("pid");
    e.shm_name = r.str("shm_name");
    e.mem_handle = r.str("mem_handle");
    if (!e.mem_handle.empty() && e.mem_handle.size() != kIpcHandleBytes)
      throw ProtocolError("handle blob has a memory handle of the wrong size");
    uint32_t nev = r.get<uint32_t>("event count");
    if (nev > kMaxEvents) throw ProtocolError("handle blob claims too many events");
    for (uint32_t k = 0; k < nev; ++k) {
      e.event_handles.push_back(r.str("event handle"));
      if (e.event_handles.back().size() != kIpcHandleBytes)
        throw ProtocolError("handle blob has an event handle of the wrong size");
    }
    out.push_back(std::move(e));
  }
  if (r.pos != body) throw ProtocolError("handle blob has trailing bytes");
  return out;
}

}  // namespace hdrt
