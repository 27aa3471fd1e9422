// fedmobillm's executor_runner: runs an ExecuTorch .pte with executor_runner's flags and
// log lines (examples/portable/executor_runner in ExecuTorch), built with the Module API
// against the prebuilt runtime of the executorch wheel (host) or an NDK build (phone).
//
// Flags (as executor_runner): --model_path, --inputs (comma-separated raw input files),
// --input_shapes (e.g. "1x64,1x64"), --output_file (base name: writes <base>-<i>.bin),
// --num_executions, --cpu_threads, --method_name, --print_output (none|summary|all).
// Output (as executor_runner, via ET_LOG): "Model loaded in X ms.", "Iteration i of N: X ms",
// "Model executed successfully N time(s) in X ms.", "K outputs: ",
// "Writing output to file: F". One addition: "Peak memory: N kB (VmHWM)." at the end.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/platform/log.h>
#include <executorch/runtime/platform/runtime.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

// The wheel ships the threadpool library but not its header: declare what we call.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

struct Flags {
  std::string model_path = "model.pte";
  std::string inputs;
  std::string input_shapes;
  std::string output_file;
  std::string method_name;
  std::string print_output = "summary";
  uint32_t num_executions = 1;
  int32_t cpu_threads = -1;
};

bool parse_flags(int argc, char** argv, Flags& f) {
  std::map<std::string, std::string*> strings = {
      {"model_path", &f.model_path},     {"inputs", &f.inputs},
      {"input_shapes", &f.input_shapes}, {"output_file", &f.output_file},
      {"method_name", &f.method_name},   {"print_output", &f.print_output}};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      ET_LOG(Error, "Extra commandline args: %s", arg.c_str());
      return false;
    }
    std::string name = arg.substr(2), value;
    auto eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      ET_LOG(Error, "Flag --%s needs a value", name.c_str());
      return false;
    }
    if (strings.count(name)) {
      *strings[name] = value;
    } else if (name == "num_executions") {
      f.num_executions = static_cast<uint32_t>(std::strtoul(value.c_str(), nullptr, 10));
    } else if (name == "cpu_threads") {
      f.cpu_threads = static_cast<int32_t>(std::strtol(value.c_str(), nullptr, 10));
    } else {
      ET_LOG(Error, "Unknown flag --%s", name.c_str());
      return false;
    }
  }
  return true;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  if (!s.empty() && s.back() == sep) out.emplace_back();
  return out;
}

bool read_file(const std::string& path, std::vector<uint8_t>& out) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return false;
  out.resize(static_cast<size_t>(f.tellg()));
  f.seekg(0);
  return static_cast<bool>(f.read(reinterpret_cast<char*>(out.data()), out.size()));
}

long peak_rss_kb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  }
  return -1;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
      .count();
}

// Input tensors: from --inputs files (shapes from --input_shapes, else the method's
// sizes), or filled with ones like executor_runner does.
bool make_inputs(Module& module, const std::string& method, const Flags& f,
                 std::vector<std::vector<uint8_t>>& storage, std::vector<TensorPtr>& tensors) {
  auto meta = module.method_meta(method);
  if (!meta.ok()) return false;
  auto files = f.inputs.empty() ? std::vector<std::string>{} : split(f.inputs, ',');
  auto shapes = f.input_shapes.empty() ? std::vector<std::string>{} : split(f.input_shapes, ',');
  size_t n = meta->num_inputs();
  if ((!files.empty() && files.size() != n) || (!shapes.empty() && shapes.size() != n)) {
    ET_LOG(Error, "Method %s has %zu inputs but %zu input files / %zu shapes were given",
           method.c_str(), n, files.size(), shapes.size());
    return false;
  }
  storage.resize(n);
  for (size_t i = 0; i < n; ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) return false;
    std::vector<executorch::aten::SizesType> sizes(info->sizes().begin(), info->sizes().end());
    if (!shapes.empty() && !shapes[i].empty()) {
      sizes.clear();
      for (auto& d : split(shapes[i], 'x')) sizes.push_back(std::stoi(d));
    }
    size_t numel = 1;
    for (auto d : sizes) numel *= static_cast<size_t>(d);
    size_t nbytes = numel * executorch::runtime::elementSize(info->scalar_type());
    if (!files.empty()) {
      if (!read_file(files[i], storage[i])) {
        ET_LOG(Error, "Failed to open input file: %s", files[i].c_str());
        return false;
      }
      if (storage[i].size() < nbytes) {
        ET_LOG(Error, "Input file %s has %zu bytes, input %zu needs %zu", files[i].c_str(),
               storage[i].size(), i, nbytes);
        return false;
      }
    } else {
      storage[i].assign(nbytes, 0);
      if (info->scalar_type() == ScalarType::Long) {
        auto* p = reinterpret_cast<int64_t*>(storage[i].data());
        for (size_t k = 0; k < numel; ++k) p[k] = 1;
      } else if (info->scalar_type() == ScalarType::Float) {
        auto* p = reinterpret_cast<float*>(storage[i].data());
        for (size_t k = 0; k < numel; ++k) p[k] = 1.0f;
      }
    }
    tensors.push_back(
        executorch::extension::from_blob(storage[i].data(), sizes, info->scalar_type()));
  }
  return true;
}

void write_outputs(const std::vector<EValue>& outputs, const Flags& f) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].isTensor()) continue;
    const auto& t = outputs[i].toTensor();
    char name[1024];
    snprintf(name, sizeof(name), "%s-%zu.bin", f.output_file.c_str(), i);
    ET_LOG(Info, "Writing output to file: %s", name);
    FILE* out = fopen(name, "wb");
    ET_CHECK_MSG(out != nullptr, "Failed to open output file: %s", name);
    fwrite(t.const_data_ptr<char>(), 1, t.nbytes(), out);
    fclose(out);
  }
}

void print_outputs(const std::vector<EValue>& outputs, const Flags& f) {
  if (f.print_output == "none") return;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].isTensor()) {
      printf("Output[%zu]: Not Tensor\n", i);
      continue;
    }
    const auto& t = outputs[i].toTensor();
    std::string shape;
    for (auto d : t.sizes()) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    printf("OutputX %zu: tensor(sizes=[%s]", i, shape.c_str());
    if (t.scalar_type() == ScalarType::Float) {
      size_t n = static_cast<size_t>(t.numel());
      size_t show = f.print_output == "all" ? n : std::min<size_t>(n, 8);
      printf(", [");
      for (size_t k = 0; k < show; ++k) printf("%s%g", k ? ", " : "", t.const_data_ptr<float>()[k]);
      printf(show < n ? ", ...])\n" : "])\n");
    } else {
      printf(")\n");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  executorch::runtime::runtime_init();
  Flags f;
  if (!parse_flags(argc, argv, f)) return 1;

  std::optional<executorch::extension::threadpool::NoThreadPoolGuard> no_pool;
  if (f.cpu_threads > 0) {
    ET_LOG(Info, "Resetting threadpool with num threads = %d", f.cpu_threads);
    executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(
        static_cast<uint32_t>(f.cpu_threads));
    if (f.cpu_threads == 1) no_pool.emplace();
  }

  auto t_load = std::chrono::steady_clock::now();
  Module module(f.model_path, Module::LoadMode::File);
  if (module.load() != Error::Ok) {
    ET_LOG(Error, "Failed to parse model file %s", f.model_path.c_str());
    return 1;
  }
  ET_LOG(Info, "Model file %s is loaded.", f.model_path.c_str());
  std::string method = f.method_name;
  if (method.empty()) {
    auto names = module.method_names();
    ET_CHECK_MSG(names.ok() && !names->empty(), "Program has no methods");
    method = names->count("forward") ? "forward" : *names->begin();
  }
  ET_LOG(Info, "Using method %s", method.c_str());
  Error err = module.load_method(method);
  ET_CHECK_MSG(err == Error::Ok, "Loading of method %s failed with status 0x%" PRIx32,
               method.c_str(), static_cast<uint32_t>(err));
  ET_LOG(Info, "Model loaded in %f ms.", ms_since(t_load));

  std::vector<std::vector<uint8_t>> storage;
  std::vector<TensorPtr> tensors;
  if (!f.inputs.empty()) ET_LOG(Info, "Loading inputs from input file(s).");
  if (!make_inputs(module, method, f, storage, tensors)) return 1;
  std::vector<EValue> inputs(tensors.begin(), tensors.end());

  double total_ms = 0;
  std::vector<EValue> outputs;
  for (uint32_t i = 0; i < f.num_executions; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    auto result = module.execute(method, inputs);
    double ms = ms_since(t0);
    ET_CHECK_MSG(result.ok(), "Execution of method %s failed with status 0x%" PRIx32,
                 method.c_str(), static_cast<uint32_t>(result.error()));
    total_ms += ms;
    ET_LOG(Info, "Iteration %" PRIu32 " of %" PRIu32 ": %f ms", i + 1, f.num_executions, ms);
    outputs = std::move(*result);
  }
  ET_LOG(Info, "Model executed successfully %" PRIu32 " time(s) in %f ms.", f.num_executions,
         total_ms);
  ET_LOG(Info, "%zu outputs: ", outputs.size());
  if (!f.output_file.empty()) write_outputs(outputs, f);
  print_outputs(outputs, f);
  ET_LOG(Info, "Peak memory: %ld kB (VmHWM).", peak_rss_kb());
  return 0;
}
