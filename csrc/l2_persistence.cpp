// L2 persisting access-policy windows (compute capability >= 8.0), for fastmini.runtime.l2_persistence.
//
// Built on first use by torch.utils.cpp_extension.load (fastmini/runtime/extension.py); plain pybind11,
// no torch headers, so the build takes seconds. Pointers, streams and graphs cross from Python as
// integers (tensor.data_ptr(), torch.cuda.Stream.cuda_stream, CUDAGraph.raw_cuda_graph()).
//
// Why the driver API (cuCtxSetLimit, cuStreamSetAttribute, ...) rather than the runtime API
// (cudaDeviceSetLimit, cudaStreamSetAttribute, ...) named in the CUDA guide: the calls are the same
// operations on the same context, but linking libcudart from the local toolkit could load a second
// CUDA runtime next to the one PyTorch ships (e.g. libcudart.so.13 beside .so.12) and fail to load
// where the toolkit's lib directory is not on the loader path. libcuda.so.1, the driver, is the one
// library every CUDA process already has loaded.
//
// Scope of each setting:
// - the persisting-L2 set-aside (CU_LIMIT_PERSISTING_L2_CACHE_SIZE) is a limit of the CUDA context
//   of this process, like cudaDeviceSetLimit; it changes nothing in the card's configuration and
//   ends with the process. It is ignored under MIG, and fixed at server start under MPS.
// - a stream's window applies to work launched on that stream afterwards (cuStreamSetAttribute:
//   "applied to subsequent work submitted to the stream").
// - a CUDA graph's kernel nodes carry their own launch attributes. The CUDA documentation says that
//   stream capture copies the stream's *priority* into kernel nodes but says nothing of its access-
//   policy window, so a window set on the capture stream may or may not reach the graph. We
//   therefore set the window on every kernel node of the captured graph explicitly
//   (set_graph_window, i.e. cudaGraphKernelNodeSetAttribute(cudaKernelNodeAttributeAccessPolicyWindow)),
//   before the graph is instantiated; count_graph_window_nodes lets a GPU test record what capture
//   alone does.

#include <cuda.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

void check(CUresult result, const char* what) {
  if (result == CUDA_SUCCESS) return;
  const char* name = nullptr;
  const char* text = nullptr;
  cuGetErrorName(result, &name);
  cuGetErrorString(result, &text);
  throw std::runtime_error(std::string("fastmini L2 persistence: ") + what + " failed: " + (name ? name : "?") +
                           " (" + (text ? text : "no description") + ")");
}

// Driver calls act on the calling thread's current context. PyTorch works in each device's primary
// context; make that current for the duration of one call, whatever state the thread is in.
class PrimaryContext {
 public:
  explicit PrimaryContext(int ordinal) {
    check(cuInit(0), "cuInit");
    check(cuDeviceGet(&device_, ordinal), "cuDeviceGet");
    check(cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
    CUresult pushed = cuCtxPushCurrent(context_);
    if (pushed != CUDA_SUCCESS) {
      cuDevicePrimaryCtxRelease(device_);
      check(pushed, "cuCtxPushCurrent");
    }
  }
  ~PrimaryContext() {
    CUcontext popped = nullptr;
    cuCtxPopCurrent(&popped);
    cuDevicePrimaryCtxRelease(device_);
  }
  PrimaryContext(const PrimaryContext&) = delete;
  PrimaryContext& operator=(const PrimaryContext&) = delete;
  CUdevice device() const { return device_; }

 private:
  CUdevice device_{};
  CUcontext context_{};
};

std::size_t attribute(CUdevice device, CUdevice_attribute which, const char* what) {
  int value = 0;
  check(cuDeviceGetAttribute(&value, which, device), what);
  return static_cast<std::size_t>(std::max(value, 0));
}

std::size_t max_window_bytes(CUdevice device) {
  return attribute(device, CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE, "query max access-policy window");
}

std::size_t current_limit() {
  std::size_t bytes = 0;
  check(cuCtxGetLimit(&bytes, CU_LIMIT_PERSISTING_L2_CACHE_SIZE), "cuCtxGetLimit(persisting L2)");
  return bytes;
}

CUlaunchAttributeValue window_value(std::uintptr_t base, std::size_t num_bytes, float hit_ratio) {
  if (!(hit_ratio >= 0.0f && hit_ratio <= 1.0f)) throw std::invalid_argument("hit_ratio must lie in [0, 1]");
  CUlaunchAttributeValue value{};
  value.accessPolicyWindow.base_ptr = reinterpret_cast<void*>(base);
  value.accessPolicyWindow.num_bytes = num_bytes;
  value.accessPolicyWindow.hitRatio = num_bytes ? hit_ratio : 0.0f;
  // Normal/Normal with zero bytes is how a window is switched off.
  value.accessPolicyWindow.hitProp = num_bytes ? CU_ACCESS_PROPERTY_PERSISTING : CU_ACCESS_PROPERTY_NORMAL;
  value.accessPolicyWindow.missProp = num_bytes ? CU_ACCESS_PROPERTY_STREAMING : CU_ACCESS_PROPERTY_NORMAL;
  return value;
}

py::dict device_limits(int ordinal) {
  PrimaryContext context(ordinal);
  py::dict limits;
  limits["l2_cache_bytes"] = attribute(context.device(), CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, "query L2 size");
  limits["max_persisting_l2_bytes"] =
      attribute(context.device(), CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, "query max persisting L2");
  limits["max_window_bytes"] = max_window_bytes(context.device());
  limits["persisting_l2_limit_bytes"] = current_limit();
  return limits;
}

// Reserve persisting L2 (clamped to the device's maximum); returns what the context reports afterwards.
std::size_t set_persisting_l2_limit(int ordinal, std::size_t bytes) {
  PrimaryContext context(ordinal);
  std::size_t most =
      attribute(context.device(), CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE, "query max persisting L2");
  check(cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, std::min(bytes, most)), "cuCtxSetLimit(persisting L2)");
  return current_limit();
}

// Window over [base, base + num_bytes) on a stream; num_bytes is clamped to the device's maximum
// window, and the clamped length is returned. num_bytes == 0 clears the window.
std::size_t set_stream_window(int ordinal, std::uintptr_t stream, std::uintptr_t base, std::size_t num_bytes,
                              float hit_ratio) {
  PrimaryContext context(ordinal);
  std::size_t bytes = std::min(num_bytes, max_window_bytes(context.device()));
  CUlaunchAttributeValue value = window_value(base, bytes, hit_ratio);
  check(cuStreamSetAttribute(reinterpret_cast<CUstream>(stream), CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW, &value),
        "cuStreamSetAttribute(access-policy window)");
  return bytes;
}

std::vector<CUgraphNode> graph_nodes(CUgraph graph) {
  std::size_t count = 0;
  check(cuGraphGetNodes(graph, nullptr, &count), "cuGraphGetNodes");
  std::vector<CUgraphNode> nodes(count);
  if (count) check(cuGraphGetNodes(graph, nodes.data(), &count), "cuGraphGetNodes");
  nodes.resize(count);
  return nodes;
}

// Calls visit(node) for every kernel node, descending into child graphs.
template <typename Visit>
void for_each_kernel_node(CUgraph graph, Visit&& visit) {
  for (CUgraphNode node : graph_nodes(graph)) {
    CUgraphNodeType type;
    check(cuGraphNodeGetType(node, &type), "cuGraphNodeGetType");
    if (type == CU_GRAPH_NODE_TYPE_KERNEL) {
      visit(node);
    } else if (type == CU_GRAPH_NODE_TYPE_GRAPH) {
      CUgraph child = nullptr;
      check(cuGraphChildGraphNodeGetGraph(node, &child), "cuGraphChildGraphNodeGetGraph");
      for_each_kernel_node(child, visit);
    }
  }
}

// The window on every kernel node of a (not yet instantiated) graph; returns the number of nodes.
std::size_t set_graph_window(int ordinal, std::uintptr_t graph, std::uintptr_t base, std::size_t num_bytes,
                             float hit_ratio) {
  PrimaryContext context(ordinal);
  CUlaunchAttributeValue value =
      window_value(base, std::min(num_bytes, max_window_bytes(context.device())), hit_ratio);
  std::size_t count = 0;
  for_each_kernel_node(reinterpret_cast<CUgraph>(graph), [&](CUgraphNode node) {
    check(cuGraphKernelNodeSetAttribute(node, CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW, &value),
          "cuGraphKernelNodeSetAttribute(access-policy window)");
    ++count;
  });
  return count;
}

// (kernel nodes, kernel nodes whose window starts at base with a non-zero length): a diagnostic.
py::tuple count_graph_window_nodes(int ordinal, std::uintptr_t graph, std::uintptr_t base) {
  PrimaryContext context(ordinal);
  std::size_t kernels = 0, windowed = 0;
  for_each_kernel_node(reinterpret_cast<CUgraph>(graph), [&](CUgraphNode node) {
    CUlaunchAttributeValue value{};
    check(cuGraphKernelNodeGetAttribute(node, CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW, &value),
          "cuGraphKernelNodeGetAttribute(access-policy window)");
    ++kernels;
    const CUaccessPolicyWindow& window = value.accessPolicyWindow;
    if (window.num_bytes > 0 && reinterpret_cast<std::uintptr_t>(window.base_ptr) == base) ++windowed;
  });
  return py::make_tuple(kernels, windowed);
}

// Demote every persisting line of the context back to normal.
void reset_persisting_lines(int ordinal) {
  PrimaryContext context(ordinal);
  check(cuCtxResetPersistingL2Cache(), "cuCtxResetPersistingL2Cache");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "L2 persisting access-policy windows over device buffers (fastmini.runtime.l2_persistence)";
  m.def("device_limits", &device_limits, py::arg("device"));
  m.def("set_persisting_l2_limit", &set_persisting_l2_limit, py::arg("device"), py::arg("bytes"));
  m.def("set_stream_window", &set_stream_window, py::arg("device"), py::arg("stream"), py::arg("base"),
        py::arg("num_bytes"), py::arg("hit_ratio"));
  m.def("set_graph_window", &set_graph_window, py::arg("device"), py::arg("graph"), py::arg("base"),
        py::arg("num_bytes"), py::arg("hit_ratio"));
  m.def("count_graph_window_nodes", &count_graph_window_nodes, py::arg("device"), py::arg("graph"),
        py::arg("base"));
  m.def("reset_persisting_lines", &reset_persisting_lines, py::arg("device"));
}
