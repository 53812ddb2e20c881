// Checks the emulated driver's own rules (driver.cpp) through the driver API,
// as cudarc calls it: deferred streams and events, the launch limits and the
// compute capability. build_driver.sh runs it after building libcuda.so, at
// both compute capabilities, lazy and eager; it prints what failed and exits
// non-zero. Usage: selftest (settings from FRUGAL_EMU_* as for the driver).
#include <cuda.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "cuda emulator selftest: FAILED: %s\n", what);
        ++failures;
    }
}

#define OK(call) check((call) == CUDA_SUCCESS, #call)

float first_float(CUdeviceptr p) {
    float x = 0;
    OK(cuMemcpyDtoH(&x, p, sizeof x));
    return x;
}

}  // namespace

// `selftest race`: issues a write and a read of the same bytes on two streams
// with nothing ordering them; the driver must abort naming the race.
int race() {
    OK(cuInit(0));
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    CUstream a, b;
    OK(cuStreamCreate(&a, CU_STREAM_NON_BLOCKING));
    OK(cuStreamCreate(&b, CU_STREAM_NON_BLOCKING));
    CUdeviceptr x, y;
    OK(cuMemAlloc(&x, 64));
    OK(cuMemAlloc(&y, 64));
    // Ordered: a's write, an event, b waits on it, then reads.
    CUevent e;
    OK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
    OK(cuMemsetD8Async(x, 0, 64, a));
    OK(cuEventRecord(e, a));
    OK(cuStreamWaitEvent(b, e, 0));
    OK(cuMemcpyDtoDAsync(y, x, 64, b));
    // Ordered by the host: it saw b complete before issuing a's write.
    OK(cuStreamSynchronize(b));
    OK(cuMemsetD8Async(x, 1, 32, a));
    // Disjoint bytes do not race.
    OK(cuMemcpyDtoDAsync(y, x + 32, 16, b));
    std::fprintf(stderr, "cuda emulator selftest: the next operation races:\n");
    cuMemcpyDtoDAsync(y, x, 64, b);  // reads a's writes, unordered: aborts
    return failures ? 1 : 0;
}

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], "race") == 0) return race();
    const char* schedule = std::getenv("FRUGAL_EMU_SCHEDULE");
    const bool eager = schedule && std::strcmp(schedule, "eager") == 0;
    const char* cc_env = std::getenv("FRUGAL_EMU_CC");
    const int cc = cc_env && *cc_env ? std::atoi(cc_env) : 90;

    OK(cuInit(0));
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    CUcontext ctx;
    OK(cuDevicePrimaryCtxRetain(&ctx, dev));
    OK(cuCtxSetCurrent(ctx));

    // The compute capability and the shared-memory limits follow FRUGAL_EMU_CC.
    int major = 0, minor = 0, optin = 0;
    OK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    OK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    OK(cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev));
    check(10 * major + minor == cc, "the compute capability is FRUGAL_EMU_CC");
    check(optin == (cc == 80 ? 166912 : cc == 90 ? 232448 : 101376), "the opt-in shared memory of the compute capability");

    CUstream a, b, launches;
    OK(cuStreamCreate(&a, CU_STREAM_NON_BLOCKING));
    OK(cuStreamCreate(&b, CU_STREAM_NON_BLOCKING));
    OK(cuStreamCreate(&launches, CU_STREAM_NON_BLOCKING));
    const float one = 1.0f, two = 2.0f;
    CUdeviceptr x, y;
    OK(cuMemAlloc(&x, 4));
    OK(cuMemAlloc(&y, 4));
    check(std::isnan(first_float(x)), "fresh device memory is poisoned with NaN");

    // A copy on b that does not wait for a's write reads the old value (lazy);
    // eager runs everything in issue order.
    OK(cuMemcpyHtoDAsync(x, &one, 4, a));
    OK(cuMemcpyDtoDAsync(y, x, 4, b));
    OK(cuStreamSynchronize(b));
    check(eager ? first_float(y) == 1.0f : std::isnan(first_float(y)), "an unordered reader runs before the writer");
    OK(cuCtxSynchronize());

    // With a wait on an event recorded after the write, it sees the write.
    CUevent e;
    OK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
    OK(cuMemcpyHtoDAsync(x, &two, 4, a));
    OK(cuEventRecord(e, a));
    OK(cuStreamWaitEvent(b, e, 0));
    OK(cuMemcpyDtoDAsync(y, x, 4, b));
    OK(cuStreamSynchronize(b));
    check(first_float(y) == 2.0f, "a wait on the record orders the reader after the writer");

    // A wait binds to the record issued before it, not to a later one.
    OK(cuMemcpyHtoDAsync(x, &one, 4, a));
    OK(cuStreamWaitEvent(b, e, 0));  // the record above, already complete
    OK(cuEventRecord(e, a));
    OK(cuMemcpyDtoDAsync(y, x, 4, b));
    OK(cuStreamSynchronize(b));
    check(eager ? first_float(y) == 1.0f : first_float(y) == 2.0f, "a wait ignores records issued after it");
    OK(cuCtxSynchronize());

    // An event never recorded is complete: waiting on it orders nothing.
    CUevent never;
    OK(cuEventCreate(&never, 0));
    OK(cuEventQuery(never));
    OK(cuStreamWaitEvent(b, never, 0));

    // Host-to-device sources are staged when the copy is issued.
    float staged = 1.0f;
    OK(cuMemcpyHtoDAsync(x, &staged, 4, a));
    staged = 3.0f;
    OK(cuStreamSynchronize(a));
    check(first_float(x) == 1.0f, "a host-to-device copy reads its source when issued");

    // Timing: only events created with timing, once their records ran.
    CUevent t0, t1;
    OK(cuEventCreate(&t0, 0));
    OK(cuEventCreate(&t1, 0));
    float ms = -1;
    OK(cuEventRecord(t0, a));
    OK(cuEventRecord(t1, a));
    if (!eager) check(cuEventElapsedTime(&ms, t0, t1) == CUDA_ERROR_NOT_READY, "elapsed time of records not yet run");
    OK(cuEventSynchronize(t1));
    OK(cuEventElapsedTime(&ms, t0, t1));
    check(ms >= 0, "elapsed time is not negative");
    check(cuEventElapsedTime(&ms, e, t1) == CUDA_ERROR_INVALID_HANDLE, "no elapsed time without timing");

    // Copies outside a live allocation are refused.
    check(cuMemcpyDtoDAsync(y, x, 8, b) == CUDA_ERROR_INVALID_VALUE, "a copy past the end of an allocation");

    // Dynamic shared memory: 48 KiB without the attribute, up to the opt-in maximum with it.
    CUmodule mod;
    CUfunction f;
    OK(cuModuleLoadData(&mod, "fatbin"));
    OK(cuModuleGetFunction(&f, mod, "bw_forward_f32_d64"));
    std::vector<unsigned char> zeros(4096);
    std::vector<void*> params(16, zeros.data());
    auto launch = [&](unsigned smem) { return cuLaunchKernel(f, 1, 1, 1, 128, 1, 1, smem, launches, params.data(), nullptr); };
    int attr = 0;
    OK(cuFuncGetAttribute(&attr, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, f));
    check(attr == 48 << 10, "the dynamic shared memory attribute starts at 48 KiB");
    if (!eager) {  // eager would run these launches on zero arguments
        OK(launch(48 << 10));
        check(launch((48 << 10) + 16) == CUDA_ERROR_INVALID_VALUE, "more than 48 KiB without the attribute");
        OK(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin));
        OK(launch(optin));
        OK(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 20000));
        check(launch(30000) == CUDA_ERROR_INVALID_VALUE, "more than the attribute, even under 48 KiB");
        check(launch(0) == CUDA_SUCCESS && launch(20000) == CUDA_SUCCESS, "up to the attribute");
    }
    check(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin + 1) == CUDA_ERROR_INVALID_VALUE,
          "an attribute past the opt-in maximum");
    CUfunction g;
    CUmodule mod2;
    OK(cuModuleLoadData(&mod2, "fatbin"));
    OK(cuModuleGetFunction(&g, mod2, "bw_forward_f32_d64"));
    OK(cuFuncGetAttribute(&attr, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, g));
    check(attr == 48 << 10, "each module's function has its own attributes");

    if (failures) return 1;
    std::fprintf(stderr, "cuda emulator selftest: ok (schedule %s, compute capability %d)\n", eager ? "eager" : "lazy", cc);
    // The launches queued above never run (their arguments are zeros): exit without draining.
    std::_Exit(0);
}
