// An emulated CUDA driver: a libcuda.so whose kernels are this crate's
// kernels-cuda/*.cu compiled as host C++ over emu.h. With it first on
// LD_LIBRARY_PATH, cudarc (which loads libcuda at run time) drives the crate's
// real CUDA launchers, so every CUDA test runs on a machine without a GPU:
// parameter structs, argument order, grids, workspaces, streams and events
// are exercised end to end. Built by tests/cuda_emu/build_driver.sh.
//
// Device memory is host memory (a CUdeviceptr is the host address); work runs
// synchronously when it is issued, which is one valid order of any stream
// schedule; events record host time. FRUGAL_EMU_TRACE=1 prints each launch. The device reports itself by name as an
// emulator, and its timings mean nothing.
#include <cuda.h>

#include "emu_registry.h"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace {

struct Event {
    std::chrono::steady_clock::time_point t{};
};

int fake_stream, fake_module, fake_context, fake_pool;
thread_local CUcontext current_ctx = nullptr;
const char* const kName = "frugal-attn CUDA emulator (CPU)";
// One launch at a time: the emulator's state (shared memory, fibers) is global.
std::mutex launch_mutex;

const frugal_emu::Kernel* find(const char* name) {
    for (const auto* table : {frugal_emu::table_static_shared(), frugal_emu::table_extern_shared()})
        for (const frugal_emu::Kernel* k = table; k->name; ++k)
            if (std::strcmp(k->name, name) == 0) return k;
    return nullptr;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, len, "%s", kName);
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem(size_t* bytes, CUdevice) {
    *bytes = size_t(16) << 30;
    return CUDA_SUCCESS;
}
CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    *free_bytes = *total = size_t(16) << 30;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetUuid(CUuuid* u, CUdevice) {
    std::memset(u, 0, sizeof *u);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 4; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y:
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 48 << 10; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 227 << 10; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = reinterpret_cast<CUcontext>(&fake_context);
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) {
    current_ctx = c;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = current_ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }

CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = reinterpret_cast<CUstream>(new int(fake_stream));
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
CUresult cuStreamDestroy(CUstream s) {
    delete reinterpret_cast<int*>(s);
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(CUstream, CUstreamCaptureStatus* st) {
    *st = CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned) {
    *e = reinterpret_cast<CUevent>(new Event);
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy(CUevent e) {
    delete reinterpret_cast<Event*>(e);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    reinterpret_cast<Event*>(e)->t = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent) { return CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    const auto d = reinterpret_cast<Event*>(b)->t - reinterpret_cast<Event*>(a)->t;
    *ms = std::chrono::duration<float, std::milli>(d).count();
    return CUDA_SUCCESS;
}

// 256-byte aligned like cudaMalloc; zero bytes still gives a unique pointer.
CUresult cuMemAlloc(CUdeviceptr* p, size_t bytes) {
    void* m = std::aligned_alloc(256, ((bytes + 255) / 256 + 1) * 256);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = reinterpret_cast<CUdeviceptr>(m);
    return CUDA_SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return cuMemAlloc(p, bytes); }
CUresult cuMemFree(CUdeviceptr p) {
    std::free(reinterpret_cast<void*>(p));
    return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree(p); }
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice) {
    *pool = reinterpret_cast<CUmemoryPool>(&fake_pool);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }
CUresult cuMemPoolSetAttribute(CUmemoryPool, CUmemPool_attribute, void*) { return CUDA_SUCCESS; }
CUresult cuMemPoolGetAttribute(CUmemoryPool, CUmemPool_attribute, void* v) {
    std::memset(v, 0, 8);
    return CUDA_SUCCESS;
}
CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return CUDA_SUCCESS; }

CUresult cuMemcpyHtoD(CUdeviceptr d, const void* s, size_t n) {
    std::memcpy(reinterpret_cast<void*>(d), s, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync(CUdeviceptr d, const void* s, size_t n, CUstream) { return cuMemcpyHtoD(d, s, n); }
CUresult cuMemcpyDtoH(void* d, CUdeviceptr s, size_t n) {
    std::memcpy(d, reinterpret_cast<const void*>(s), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync(void* d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoH(d, s, n); }
CUresult cuMemcpyDtoD(CUdeviceptr d, CUdeviceptr s, size_t n) {
    std::memmove(reinterpret_cast<void*>(d), reinterpret_cast<const void*>(s), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) { return cuMemcpyDtoD(d, s, n); }
CUresult cuMemcpyPeerAsync(CUdeviceptr d, CUcontext, CUdeviceptr s, CUcontext, size_t n, CUstream) {
    return cuMemcpyDtoD(d, s, n);
}
CUresult cuMemsetD8(CUdeviceptr d, unsigned char v, size_t n) {
    std::memset(reinterpret_cast<void*>(d), v, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) { return cuMemsetD8(d, v, n); }
CUresult cuMemsetD32(CUdeviceptr d, unsigned v, size_t n) {
    auto* p = reinterpret_cast<unsigned*>(d);
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return CUDA_SUCCESS;
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) { return cuMemsetD32(d, v, n); }

CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = reinterpret_cast<CUmodule>(&fake_module);
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    const frugal_emu::Kernel* k = find(name);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    *f = reinterpret_cast<CUfunction>(const_cast<frugal_emu::Kernel*>(k));
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
    const auto* k = reinterpret_cast<const frugal_emu::Kernel*>(f);
    if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES && (v < 0 || size_t(v) > k->max_dynamic_smem))
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(CUfunction, CUfunc_cache) { return CUDA_SUCCESS; }
CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction) {
    *v = a == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream, void** params, void** extra) {
    const auto* k = reinterpret_cast<const frugal_emu::Kernel*>(f);
    if (extra || !params) return CUDA_ERROR_INVALID_VALUE;
    if (size_t(bx) * by * bz > 1024 || !gx || !gy || !gz || !bx || !by || !bz) return CUDA_ERROR_INVALID_VALUE;
    if (gy > 65535 || gz > 65535) return CUDA_ERROR_INVALID_VALUE;
    if (smem > k->max_dynamic_smem || (smem > (48u << 10) && !k->extern_smem)) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(launch_mutex);
    static const bool trace = std::getenv("FRUGAL_EMU_TRACE") != nullptr;
    if (trace) std::fprintf(stderr, "cuda emulator: %s grid (%u, %u, %u) block (%u, %u, %u) smem %u\n", k->name, gx, gy, gz, bx, by, bz, smem);
    k->launch(*k, emu::Dim{gx, gy, gz}, emu::Dim{bx, by, bz}, smem, params);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == CUDA_SUCCESS ? "no error" : "error in the CUDA emulator";
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == CUDA_SUCCESS ? "CUDA_SUCCESS" : "CUDA_ERROR (emulator)";
    return CUDA_SUCCESS;
}

// cuda.h maps these names to their _v2 versions; cudarc may load either.
#undef cuDeviceGetUuid
#undef cuEventElapsedTime
CUresult cuDeviceGetUuid(CUuuid* u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime_v2(ms, a, b); }

}  // extern "C"
