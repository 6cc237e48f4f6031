// The C ABI between ddpm-dist and libtorch's c10d (torch.distributed's C++ core).
//
// Every function catches every C++ exception and reports it as a malloc'd message in
// `*err` (freed by ddpm_dist_free_message) with a non-zero / NULL return: an exception
// that unwinds into Rust is undefined behaviour. Handles are heap boxes of c10d's
// intrusive pointers; the Rust side owns them and frees each exactly once.
//
// Only the backend constructor differs between Gloo (CPU tensors) and NCCL (CUDA
// tensors): both are held as a c10d::Backend and every collective goes through it.

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef DDPM_DIST_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct StoreBox {
  c10::intrusive_ptr<c10d::Store> store;
  int port;  // the TCPStore's bound port (its server's, or the one it connected to)
};

struct GroupBox {
  c10::intrusive_ptr<c10d::Backend> backend;
};

char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, message.c_str(), message.size() + 1);
  }
  return out;
}

// Runs `body`; on an exception stores its message in *err and returns false.
template <typename F>
bool guarded(char** err, F&& body) {
  try {
    body();
    return true;
  } catch (const c10::Error& e) {
    *err = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *err = copy_message(e.what());
  } catch (...) {
    *err = copy_message("unknown C++ exception");
  }
  return false;
}

std::chrono::milliseconds millis(int64_t ms) { return std::chrono::milliseconds(ms); }

// c10d's flight recorder (a process-wide record of every collective) is written without
// a lock when a collective is enqueued: two groups in one process (ranks as threads, as
// the tests run them) corrupt it and crash. Enqueueing takes this lock; the wait for the
// result does not, so collectives of different groups still overlap.
std::mutex& enqueue_lock() {
  static std::mutex lock;
  return lock;
}

}  // namespace

extern "C" {

void ddpm_dist_free_message(char* message) { std::free(message); }

int ddpm_dist_has_nccl() {
#ifdef DDPM_DIST_NCCL
  return 1;
#else
  return 0;
#endif
}

// A TCPStore: the server when `is_server` (port 0 binds a free port), else a client
// that keeps trying to connect for `timeout_ms`. `timeout_ms` also bounds each get/wait.
void* ddpm_store_tcp(const char* host, int port, int is_server, int world_size,
                     int64_t timeout_ms, char** err) {
  StoreBox* out = nullptr;
  guarded(err, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = is_server != 0;
    opts.numWorkers = world_size;
    opts.waitWorkers = false;  // the process group's own rendezvous waits for the ranks
    opts.timeout = millis(timeout_ms);
    opts.multiTenant = false;
    opts.useLibUV = false;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    int bound = store->getPort();
    out = new StoreBox{store, bound};
  });
  return out;
}

// A view of `base` whose keys all start with `prefix/` (one per attempt or group).
void* ddpm_store_prefixed(void* base, const char* prefix, char** err) {
  StoreBox* out = nullptr;
  guarded(err, [&] {
    auto* b = static_cast<StoreBox*>(base);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), b->store);
    out = new StoreBox{store, b->port};
  });
  return out;
}

int ddpm_store_port(void* store) { return static_cast<StoreBox*>(store)->port; }

void ddpm_store_free(void* store) { delete static_cast<StoreBox*>(store); }

int ddpm_store_set(void* store, const char* key, const uint8_t* data, size_t len, char** err) {
  bool ok = guarded(err, [&] {
    std::vector<uint8_t> value(data, data + len);
    static_cast<StoreBox*>(store)->store->set(std::string(key), value);
  });
  return ok ? 0 : 1;
}

// Waits (up to the store's timeout) for `key`; the value is malloc'd into *data.
int ddpm_store_get(void* store, const char* key, uint8_t** data, size_t* len, char** err) {
  bool ok = guarded(err, [&] {
    std::vector<uint8_t> value = static_cast<StoreBox*>(store)->store->get(std::string(key));
    uint8_t* buf = static_cast<uint8_t*>(std::malloc(value.empty() ? 1 : value.size()));
    if (buf == nullptr) {
      throw std::bad_alloc();
    }
    if (!value.empty()) {
      std::memcpy(buf, value.data(), value.size());
    }
    *data = buf;
    *len = value.size();
  });
  return ok ? 0 : 1;
}

void ddpm_dist_free_bytes(uint8_t* data) { std::free(data); }

// A Gloo process group bound to the network interface `interface` (e.g. "eth0") if given,
// else to the address of `hostname` if given, else to torch's default (this machine's
// hostname, or loopback when it does not resolve).
void* ddpm_group_gloo(void* store, int rank, int world_size, const char* hostname,
                      const char* interface, int64_t timeout_ms, char** err) {
  GroupBox* out = nullptr;
  guarded(err, [&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(millis(timeout_ms));
    std::string host(hostname);
    std::string iface(interface);
    if (!iface.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (!host.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    opts->threads = 1;  // one collective at a time: more threads only compete for cores
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(
        static_cast<StoreBox*>(store)->store, rank, world_size, opts);
    out = new GroupBox{group};
  });
  return out;
}

// An NCCL process group; the caller has made `device_index` the current CUDA device.
void* ddpm_group_nccl(void* store, int rank, int world_size, int64_t timeout_ms, char** err) {
  GroupBox* out = nullptr;
  guarded(err, [&] {
#ifdef DDPM_DIST_NCCL
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = millis(timeout_ms);
    auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        static_cast<StoreBox*>(store)->store, rank, world_size, opts);
    out = new GroupBox{group};
#else
    (void)store;
    (void)rank;
    (void)world_size;
    (void)timeout_ms;
    throw std::runtime_error(
        "this build of ddpm has no NCCL: its build found no NCCL/CUDA headers "
        "(scripts/setup-libtorch.sh installs them)");
#endif
  });
  return out;
}

void ddpm_group_free(void* group) {
  auto* g = static_cast<GroupBox*>(group);
  char* ignored = nullptr;
  // Shutting down releases the backend's resources (NCCL communicators) before the
  // destructor; a failure here has nowhere useful to go.
  guarded(&ignored, [&] { g->backend->shutdown(); });
  std::free(ignored);
  delete g;
}

// In place: `tensor` becomes the sum over the ranks. `timeout_ms` bounds this call.
int ddpm_group_allreduce_sum(void* group, at::Tensor* tensor, int64_t timeout_ms, char** err) {
  bool ok = guarded(err, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = millis(timeout_ms);
    c10::intrusive_ptr<c10d::Work> work;
    {
      std::lock_guard<std::mutex> guard(enqueue_lock());
      work = static_cast<GroupBox*>(group)->backend->allreduce(tensors, opts);
    }
    work->wait(millis(timeout_ms));
  });
  return ok ? 0 : 1;
}

// In place: every rank's `tensor` becomes `root`'s.
int ddpm_group_broadcast(void* group, at::Tensor* tensor, int root, int64_t timeout_ms,
                         char** err) {
  bool ok = guarded(err, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    opts.timeout = millis(timeout_ms);
    c10::intrusive_ptr<c10d::Work> work;
    {
      std::lock_guard<std::mutex> guard(enqueue_lock());
      work = static_cast<GroupBox*>(group)->backend->broadcast(tensors, opts);
    }
    work->wait(millis(timeout_ms));
  });
  return ok ? 0 : 1;
}

}  // extern "C"
