// sngm_native::{sumsq, finalize, update} for the CUDA dispatch key (docs/ops.md): the argument
// checks (sngm_common.h's, the CPU side's too), the device table of the lists' pointers (cached:
// see device_table), the current device and stream, then the launchers of sngm_cuda.cu. Module
// sngm_ext._C_cuda; the schemas are defined in Python (sngm_ext/_ops.py), so this registers
// implementations only and needs no other module.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "../sngm_common.h"
#include "sngm_cuda.h"

extern "C" SNGM_USED const char sngm_cuda_source_marker[] =
    "sngm-source-hash:" SNGM_STR(SNGM_SOURCE_HASH);

namespace sngm {
namespace {

cuda::Dtype to_dtype(c10::ScalarType t, const char* op) {
  switch (t) {
    case c10::kFloat:
      return cuda::Dtype::kFloat;
    case c10::kDouble:
      return cuda::Dtype::kDouble;
    case c10::kBFloat16:
      return cuda::Dtype::kBFloat16;
    case c10::kHalf:
      return cuda::Dtype::kHalf;
    default:
      check_param_dtype(t, op, "params");  // throws: check_lists let no other dtype through
  }
  return cuda::Dtype::kFloat;  // not reached
}

// The checks of sumsq's and update's lists and chunk table (sngm_common.h), but not the table's
// contents: they live on the device (the kernels skip rows that do not fit). Returns the device.
c10::Device check_lists_and_table(const char* op, at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum, const at::Tensor& chunks) {
  const c10::Device device = call_device(op, "chunks", chunks, c10::DeviceType::CUDA);
  check_table(op, chunks, device);
  TORCH_CHECK(chunks.size(1) < (int64_t{1} << 31), "sngm_native::", op, ": ", chunks.size(1),
              " chunks, more than one launch takes (2^31 - 1)");
  check_lists(op, device, params, grads, momentum);
  return device;
}

// GradScaler's scalar (checked by check_scalar) as the kernels read it: a device pointer or none.
const float* scalar_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// torch.optim.SGD's tensor lr (checked by check_update_inputs), which the update kernel loads when
// it runs (no host sync); `lr` is then not read.
cuda::LearningRate learning_rate(const std::optional<at::Tensor>& lr_tensor, double lr) {
  if (!lr_tensor.has_value()) {
    return cuda::LearningRate{lr, nullptr, nullptr};
  }
  if (lr_tensor->scalar_type() == c10::kDouble) {
    return cuda::LearningRate{0.0, nullptr, lr_tensor->const_data_ptr<double>()};
  }
  return cuda::LearningRate{0.0, lr_tensor->const_data_ptr<float>(), nullptr};
}

// ---- The device tables (sngm_cuda.h TensorRow), cached ----------------------------------------
//
// A table is the int64 tensor [n, 4] of rows {param, grad, momentum (0 without), numel}. It is
// cached under its key: the device index followed by the very contents of its rows. The same key
// therefore always gives a table with exactly the rows a fresh build would have (a cached table
// never points at memory its tensors left: a moved or reallocated tensor is another key), and a
// steady loop (same params; grads and momentum recycled by the caching allocator at the same
// addresses) builds and uploads nothing. A new key builds a table: filled in pinned memory and
// copied on the current stream without a host sync (the caching host allocator keeps the pinned
// block until the copy is done). A cached table is only ever read by kernels, never written after
// its upload.
//
// Streams. A table lives in a block of the caching allocator allocated on its upload stream H;
// when the cache drops it, the block goes back to H's pool and later work on H may reuse it, which
// is stream-ordered after every kernel on H that read it. A call on another stream S reads it
// too: before that launch, S waits for the upload (an event recorded after the copy on H) and the
// block is marked as used on S (recordStream), so that freeing it records an event on S and the
// allocator reuses the block only once S's kernels enqueued so far are done. Dropping a table
// while a kernel on any stream still reads it thus never frees memory under that kernel, and the
// cache can be cleared from any thread on any stream. (The alternative, clearing only when a build
// runs on the stream of every dropped table, would not cover a table read on several streams.)
// Entries are dropped outside the lock (freeing may call torch's tracing hooks).
//
// CUDA graphs. A captured kernel keeps the table's address for every replay, so a table read
// during a capture is marked and never dropped (the bound does not count it). No wait is captured
// for its upload (waiting on an event recorded outside a capture would add one external node per
// call to the graph): the upload was enqueued on H right before the table's first kernel, which
// covers these very tensors, and a graph is replayed after its warm-up (torch.cuda.graph even
// synchronizes the device before capturing). A table that does not exist yet when a capture asks
// for it is built in the capture (its copy from the pinned buffer is a node of the graph, redone at
// each replay): it is neither cached nor served to anyone else (its memory is filled only when
// the graph runs), and it and its pinned buffer are kept for good, so that no replay reads or
// copies freed memory. A warm-up step before capturing makes the captured step read cached tables
// only.
constexpr size_t kMaxCachedTables = 4096;  // norm_in_backward asks for one table per param a step

struct UploadEvent {  // the event recorded after a table's upload, on its upload stream
  cudaEvent_t event = nullptr;
  UploadEvent() = default;
  UploadEvent(const UploadEvent&) = delete;
  UploadEvent& operator=(const UploadEvent&) = delete;
  ~UploadEvent() {
    if (event != nullptr) {
      // Destroying an event whose work is pending is allowed (released once it completes), and
      // waits already enqueued on it are kept. Not checked: nothing to do about it here.
      (void)cudaEventDestroy(event);
    }
  }
};

struct CachedTable {
  at::Tensor table;                     // int64 [n, 4] on the device
  cudaStream_t stream;                  // H: where it was allocated and uploaded
  std::shared_ptr<UploadEvent> upload;  // recorded on H right after the copy
  bool in_graph = false;                // read by a captured graph: never dropped
};

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const noexcept {
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ key.size();
    for (const int64_t v : key) {  // splitmix64 of each value, chained
      uint64_t x = h ^ static_cast<uint64_t>(v);
      x += 0x9e3779b97f4a7c15ULL;
      x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
      x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
      h = x ^ (x >> 31);
    }
    return static_cast<size_t>(h);
  }
};

struct TableCache {
  std::mutex mutex;  // guards everything below
  std::unordered_map<std::vector<int64_t>, CachedTable, KeyHash> tables;
  size_t droppable = 0;                // entries of `tables` not in_graph
  std::vector<at::Tensor> graph_only;  // built during a capture (table and pinned source): kept
};

TableCache& table_cache() {
  // Never destroyed: at exit the CUDA runtime and torch's allocators may already be gone.
  static TableCache* cache = new TableCache();
  return *cache;
}

// The device table of these lists (checked by check_lists) for a launch on `stream`, the current
// stream of `device` (the caller holds a guard for `device`). `writes`: update writes params and
// momentum, so it takes their mutable pointers (a copy-on-write storage is materialized first),
// which are then the table's, and its key's, addresses.
at::Tensor device_table(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                        c10::Device device, bool writes, const c10::cuda::CUDAStream& stream) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto address = [](const void* p) {
    return static_cast<int64_t>(reinterpret_cast<intptr_t>(p));
  };
  // key[0] the device index, key[1 + 4 i + k] row i's field k (sngm_cuda.h TensorRow)
  std::vector<int64_t> key(1 + 4 * static_cast<size_t>(n));
  key[0] = device.index();
  for (int64_t i = 0; i < n; ++i) {
    int64_t* row = key.data() + 1 + 4 * i;
    row[0] = address(writes ? params[i].mutable_data_ptr() : params[i].const_data_ptr());
    row[1] = address(grads[i].const_data_ptr());
    row[2] = momentum.empty() ? 0 : address(momentum[i].mutable_data_ptr());
    row[3] = params[i].numel();
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;  // active or invalidated
  TableCache& cache = table_cache();

  {  // a cached table: copied out under the lock (the references keep it and its event alive)
    at::Tensor table;
    std::shared_ptr<UploadEvent> upload;
    bool other_stream = false;
    {
      std::lock_guard<std::mutex> lock(cache.mutex);
      const auto it = cache.tables.find(key);
      if (it != cache.tables.end()) {
        CachedTable& e = it->second;
        if (capturing && !e.in_graph) {
          e.in_graph = true;  // from now on the graph reads it at each replay: never dropped
          --cache.droppable;
        }
        table = e.table;
        upload = e.upload;
        other_stream = e.stream != stream.stream();
      }
    }
    if (table.defined()) {
      if (other_stream && !capturing) {
        C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), upload->event, 0));
        c10::cuda::CUDACachingAllocator::recordStream(table.storage().data_ptr(), stream);
      }
      return table;
    }
  }

  // A new key: build (outside the lock: pinned allocation and copy), then cache.
  at::Tensor host = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  if (n > 0) {
    std::memcpy(host.data_ptr<int64_t>(), key.data() + 1, sizeof(int64_t) * 4 * n);
  }
  at::Tensor table = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong).device(device));
  table.copy_(host, /*non_blocking=*/true);
  if (capturing) {
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.graph_only.push_back(table);
    cache.graph_only.push_back(host);
    return table;
  }
  auto upload = std::make_shared<UploadEvent>();
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&upload->event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(upload->event, stream.stream()));
  std::vector<CachedTable> dropped;  // destroyed after `lock` is released
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (cache.tables.find(key) != cache.tables.end()) {
    return table;  // another thread cached this key meanwhile: this call uses its own build
  }
  if (cache.droppable >= kMaxCachedTables) {
    // Drop every entry no graph reads (see Streams above: safe whatever stream still reads one).
    dropped.reserve(cache.droppable);
    for (auto it = cache.tables.begin(); it != cache.tables.end();) {
      if (it->second.in_graph) {
        ++it;
      } else {
        dropped.push_back(std::move(it->second));
        it = cache.tables.erase(it);
      }
    }
    cache.droppable = 0;
  }
  cache.tables.emplace(std::move(key),
                       CachedTable{table, stream.stream(), std::move(upload), false});
  ++cache.droppable;
  return table;
}

cuda::Lists lists_of(at::TensorList params, const at::Tensor& table, const at::Tensor& chunks,
                     const float* grad_scale, const char* op) {
  cuda::Lists l;
  l.dtype = params.empty() ? cuda::Dtype::kFloat : to_dtype(params[0].scalar_type(), op);
  l.table = reinterpret_cast<const cuda::TensorRow*>(table.const_data_ptr<int64_t>());
  l.n_tensors = table.size(0);
  l.chunks = chunks.const_data_ptr<int64_t>();
  l.n_chunks = chunks.size(1);
  l.grad_scale = grad_scale;
  return l;
}

void sumsq(at::TensorList params, at::TensorList grads, const at::Tensor& chunks,
           const std::optional<at::Tensor>& grad_scale, double weight_decay, bool maximize,
           const at::Tensor& partials, int64_t partial_offset) {
  const c10::Device device = check_lists_and_table("sumsq", params, grads, {}, chunks);
  check_scalar("sumsq", "grad_scale", grad_scale, device);
  const int64_t n = chunks.size(1);
  check_partials(partials, partial_offset, n, device);
  if (n == 0) {
    return;
  }
  c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const at::Tensor table = device_table(params, grads, {}, device, /*writes=*/false, stream);
  C10_CUDA_CHECK(cuda::launch_sumsq(lists_of(params, table, chunks, scalar_ptr(grad_scale),
                                             "sumsq"),
                                    weight_decay, maximize,
                                    partials.data_ptr<double>() + partial_offset,
                                    partials.size(1), stream.stream()));
}

void finalize(const at::Tensor& partials, const at::Tensor& seg_ptr,
              const std::optional<at::Tensor>& found_inf, const at::Tensor& sumsq) {
  const c10::Device device = call_device("finalize", "sumsq", sumsq, c10::DeviceType::CUDA);
  check_finalize(partials, seg_ptr, found_inf, sumsq, device);
  c10::cuda::CUDAGuard guard(device);
  // partials [3, n_partials] and sumsq [3, m] (check_rows3): the launchers take size(1)
  C10_CUDA_CHECK(cuda::launch_finalize(partials.const_data_ptr<double>(), partials.size(1),
                                       seg_ptr.const_data_ptr<int64_t>(), seg_ptr.numel() - 1,
                                       scalar_ptr(found_inf), sumsq.data_ptr<double>(),
                                       sumsq.size(1), sumsq.size(1) > 1,
                                       c10::cuda::getCurrentCUDAStream(device.index())));
}

void update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
            const at::Tensor& chunks, const at::Tensor& sumsq,
            const std::optional<at::Tensor>& grad_scale,
            const std::optional<at::Tensor>& lr_tensor, double lr, double momentum,
            double weight_decay, bool nesterov, bool maximize) {
  const c10::Device device =
      check_lists_and_table("update", params, grads, momentum_buffers, chunks);
  check_update_inputs(sumsq, grad_scale, lr_tensor, device);
  if (chunks.size(1) == 0) {
    return;
  }
  c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const at::Tensor table =
      device_table(params, grads, momentum_buffers, device, /*writes=*/true, stream);
  C10_CUDA_CHECK(cuda::launch_update(lists_of(params, table, chunks, scalar_ptr(grad_scale),
                                              "update"),
                                     !momentum_buffers.empty(), sumsq.const_data_ptr<double>(),
                                     sumsq.size(1), learning_rate(lr_tensor, lr), momentum,
                                     weight_decay, nesterov, maximize, stream.stream()));
}

}  // namespace
}  // namespace sngm

TORCH_LIBRARY_IMPL(sngm_native, CUDA, m) {
  m.impl("sumsq", &sngm::sumsq);
  m.impl("finalize", &sngm::finalize);
  m.impl("update", &sngm::update);
}
