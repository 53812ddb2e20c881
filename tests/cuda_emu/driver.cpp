// An emulated CUDA driver: a libcuda.so whose kernels are this crate's
// kernels-cuda/*.cu compiled as host C++ over emu.h. With it first on
// LD_LIBRARY_PATH, cudarc (which loads libcuda at run time) drives the crate's
// real CUDA launchers, so every CUDA test runs on a machine without a GPU:
// parameter structs, argument order, grids, workspaces, streams and events
// are exercised end to end. Built by tests/cuda_emu/build_driver.sh.
//
// Device memory is host memory (a CUdeviceptr is the host address), poisoned
// with 0xff bytes (NaN) when allocated and when freed; copies and memsets are
// checked against the live allocations.
//
// Streams are deferred and adversarially ordered (FRUGAL_EMU_SCHEDULE=lazy,
// the default): kernel launches, async copies, memsets, frees, event records
// and stream waits queue on their stream and run only when the host must
// observe them (a stream, event or context synchronize or query, a copy to
// the host, a synchronous free, a stream destroy, a module unload). Draining
// honours only what CUDA guarantees: FIFO within a stream, a
// cuStreamWaitEvent on the last record of the event issued before it, the
// legacy default stream's ordering against blocking streams. Among the
// streams whose next operation may run, the one issued last runs first, so a
// missing wait lets the consumer run before its producer. Kernel arguments
// are copied and host-to-device sources staged at issue, as CUDA does. Event
// records take the host time when they execute. FRUGAL_EMU_SCHEDULE=eager runs
// every operation when it is issued instead.
//
// Races, whatever order the work then runs in: every operation carries a
// vector clock of what is ordered before it (its stream, the records it
// waits on, the legacy stream, what the host had seen complete when it issued
// it), and every access to device memory (copies, memsets, frees,
// stream-ordered allocations, and a kernel's pointer arguments, each taken to
// reach the end of its allocation, written unless `const`) is checked against
// the earlier accesses of other streams: two that overlap, one a write, with
// neither ordered before the other, abort with both named. A kernel's
// accesses through pointers inside its parameter structs are not seen.
// FRUGAL_EMU_RACES=off turns the check off.
//
// Launch limits as on the hardware: a launch with more dynamic shared memory
// than the function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (48 KiB
// unless raised, up to the device's opt-in maximum) fails with
// CUDA_ERROR_INVALID_VALUE. FRUGAL_EMU_CC (80, 86, 89 or 90; default 90) sets
// the compute capability reported and that maximum.
//
// FRUGAL_EMU_TRACE=1 prints each kernel as it runs, =2 every operation. The
// device reports itself by name as an emulator, and its timings mean nothing.
#include <cuda.h>

#include "emu_registry.h"
#include "nccl_emu.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
const char* const kName = "frugal-attn CUDA emulator (CPU)";
constexpr unsigned kDefaultSmem = 48u << 10;

[[noreturn]] void fail(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::abort();
}

// ---- configuration (environment) -------------------------------------------

struct Config {
    bool eager = false;
    bool races = true;  // check every access for races (FRUGAL_EMU_RACES=off: do not)
    int trace = 0;
    int cc = 90;
    unsigned smem_optin = 232448;  // bytes of dynamic shared memory per block, opted in
    unsigned smem_per_sm = 233472;
    int threads_per_sm = 2048;
    double nccl_timeout = 300;  // seconds a host wait for NCCL work no thread issues may last
    std::string error;  // a bad setting: cuInit fails and says why
};

const Config& config() {
    static const Config c = [] {
        Config c;
        if (const char* s = std::getenv("FRUGAL_EMU_SCHEDULE"); s && *s) {
            if (std::strcmp(s, "eager") == 0) c.eager = true;
            else if (std::strcmp(s, "lazy") != 0) c.error = std::string("FRUGAL_EMU_SCHEDULE=") + s + ": expected lazy or eager";
        }
        if (const char* s = std::getenv("FRUGAL_EMU_TRACE"); s && *s) c.trace = std::atoi(s) > 1 ? 2 : 1;
        if (const char* s = std::getenv("FRUGAL_EMU_RACES"); s && *s) {
            if (std::strcmp(s, "off") == 0) c.races = false;
            else if (std::strcmp(s, "on") != 0) c.error = std::string("FRUGAL_EMU_RACES=") + s + ": expected on or off";
        }
        if (const char* s = std::getenv("FRUGAL_EMU_CC"); s && *s) {
            c.cc = std::atoi(s);
            switch (c.cc) {
                case 80: c.smem_optin = 166912, c.smem_per_sm = 167936; break;
                case 86:
                case 89: c.smem_optin = 101376, c.smem_per_sm = 102400, c.threads_per_sm = 1536; break;
                case 90: break;
                default: c.error = std::string("FRUGAL_EMU_CC=") + s + ": expected 80, 86, 89 or 90";
            }
        }
        if (const char* s = std::getenv("FRUGAL_EMU_NCCL_TIMEOUT"); s && *s) c.nccl_timeout = std::atof(s);
        if (!c.error.empty()) std::fprintf(stderr, "cuda emulator: %s\n", c.error.c_str());
        return c;
    }();
    return c;
}

// ---- streams, events, queued operations ------------------------------------

struct Stream;

// A vector clock over streams (indexed by Stream::slot): entry i is the
// number of stream i's operations ordered before.
using VectorClock = std::vector<uint64_t>;
void join(VectorClock& a, const VectorClock& b) {
    if (a.size() < b.size()) a.resize(b.size());
    for (size_t i = 0; i < b.size(); ++i) a[i] = std::max(a[i], b[i]);
}
uint64_t at(const VectorClock& v, unsigned i) { return i < v.size() ? v[i] : 0; }

struct Op;

// One send or receive of an NCCL group (nccl.cpp, through nccl_emu.h). A send
// and a receive of the same communicator and pair are matched in issue order;
// their copy runs once both their operations are reached.
struct Endpoint {
    FrugalEmuP2p p;
    uint64_t nth = 0;  // its number among the sends (or receives) of its pair, from 1
    Op* op = nullptr;  // the operation it belongs to (alive until the endpoint is done)
    std::shared_ptr<Endpoint> partner;  // the matching receive or send, once issued; reset when done
    bool done = false;
};

// One queued operation. It runs once every dependency has run and it is at
// the head of its stream's queue; an NCCL group (with endpoints) also waits
// until the operation of each of its endpoints' partners has been reached
// (is at the head of its queue, its dependencies done), then runs all its
// copies at once.
struct Op {
    uint64_t seq = 0;  // issue order, from 1
    Stream* stream = nullptr;
    bool done = false;
    std::vector<std::shared_ptr<Op>> deps;
    std::function<void()> run;  // empty for event records' and waits' bookkeeping
    const char* kind = "";
    VectorClock clock;  // what the operation is ordered after (happens-before), itself included
    std::vector<std::shared_ptr<Endpoint>> endpoints;  // an NCCL group's sends and receives
};

struct Stream {
    unsigned id = 0;    // for messages
    unsigned slot = 0;  // its entry in vector clocks
    uint64_t epoch = 0; // operations issued so far
    bool blocking = true;  // synchronizes with the legacy default stream
    std::deque<std::shared_ptr<Op>> queue;
    std::shared_ptr<Op> last;  // the last operation issued
};

struct Event {
    bool timing = true;
    std::shared_ptr<Op> last;  // the last record issued (null: never recorded)
    Clock::time_point t{};
};
using EventHandle = std::shared_ptr<Event>;  // a CUevent points to one; queued records share the Event

struct Function {
    const frugal_emu::Kernel* kernel;
    int max_dynamic_smem = kDefaultSmem;
    int carveout = -1;
};
struct Module {
    std::map<std::string, std::unique_ptr<Function>> functions;
};

// One access of an operation to device memory, for the race check.
struct Access {
    unsigned slot, stream_id;
    uint64_t epoch, seq;
    uintptr_t lo, hi;
    bool write;
    const char* kind;
};
struct Alloc {
    size_t bytes;
    bool freed = false;  // a free is queued
    std::vector<Access> accesses;  // not yet known to the host to be complete
};
// What an operation reads or writes: [p, p + n).
struct Touch {
    uintptr_t p;
    size_t n;
    bool write;
};

// The whole driver state, behind one lock: the emulator's kernels (shared
// memory, fibers) run one at a time anyway.
struct Driver {
    std::mutex m;
    uint64_t seq = 0;
    unsigned next_stream_id = 1, next_slot = 1;
    Stream legacy;  // the NULL stream, slot 0
    std::vector<Stream*> streams{&legacy};
    VectorClock host;  // what the host has seen complete
    std::map<uintptr_t, Alloc> allocs;  // live device allocations by address
    std::deque<std::pair<void*, size_t>> quarantine;  // freed blocks, held back from reuse for a while
    size_t quarantined = 0;
    // NCCL's point-to-point transfers (nccl_emu.h): per (communicator, sender,
    // receiver) the endpoints issued and not yet matched (all of one kind),
    // and how many sends and receives were issued.
    struct Channel {
        uint64_t sends = 0, recvs = 0;
        std::deque<std::shared_ptr<Endpoint>> unmatched;
    };
    std::map<std::tuple<uint64_t, int, int>, Channel> channels;
    struct Rank {
        std::thread::id owner;  // the thread that joined, which issues its work
        bool left = false;      // its communicator was destroyed or aborted
    };
    std::map<std::pair<uint64_t, int>, Rank> ranks;  // by (communicator, rank)
    // A host wait for NCCL work not yet issued sleeps on `progress`, which is
    // notified when work runs or is issued (`generation` counts those events);
    // `waiting` holds the sleeping threads and the generation they last saw.
    std::condition_variable_any progress;
    uint64_t generation = 0;
    std::map<std::thread::id, uint64_t> waiting;
};

Driver& drv() {
    static Driver* d = new Driver;  // never destroyed: cudarc may call in during exit
    return *d;
}

thread_local CUcontext current_ctx = nullptr;
thread_local Stream* per_thread_stream = nullptr;
int fake_context, fake_pool;

Stream* resolve(Driver& d, CUstream s) {
    if (s == nullptr || s == CU_STREAM_LEGACY) return &d.legacy;
    if (s == CU_STREAM_PER_THREAD) {
        if (!per_thread_stream) {
            per_thread_stream = new Stream;  // lives as long as the process
            per_thread_stream->id = d.next_stream_id++;
            per_thread_stream->slot = d.next_slot++;
            d.streams.push_back(per_thread_stream);
        }
        return per_thread_stream;
    }
    return reinterpret_cast<Stream*>(s);
}

bool finished(const std::shared_ptr<Op>& op) { return !op || op->done; }

void require_device(const Driver& d, CUdeviceptr p, size_t n, const char* what);

// Called when work ran or NCCL work was issued: wakes the host waits for NCCL work.
void progressed(Driver& d) {
    ++d.generation;
    if (!d.waiting.empty()) d.progress.notify_all();
}

// "rank 0's send of 96 float32 to rank 1 (its 3rd to rank 1) on stream 4": for messages.
std::string describe(const Endpoint& e) {
    char msg[256];
    const char* th = e.nth % 10 == 1 && e.nth % 100 != 11 ? "st" : e.nth % 10 == 2 && e.nth % 100 != 12 ? "nd"
                   : e.nth % 10 == 3 && e.nth % 100 != 13 ? "rd" : "th";
    std::snprintf(msg, sizeof msg, "rank %d's %s of %zu %s %s rank %d (its %llu%s %s rank %d) on stream %u", e.p.self,
                  e.p.send ? "send" : "receive", e.p.count, e.p.type, e.p.send ? "to" : "from", e.p.peer,
                  (unsigned long long)e.nth, th, e.p.send ? "to" : "from", e.p.peer, e.op ? e.op->stream->id : 0u);
    return msg;
}

// The copy of a matched send and receive: both are done after it.
void transfer(Driver& d, Endpoint& e) {
    Endpoint& s = e.p.send ? e : *e.partner;
    Endpoint& r = e.p.send ? *e.partner : e;
    const size_t n = s.p.count * s.p.elem_bytes;
    require_device(d, s.p.ptr, n, "nccl send");
    require_device(d, r.p.ptr, n, "nccl receive");
    if (config().trace)
        std::fprintf(stderr, "cuda emulator: nccl: %zu %s from rank %d (stream %u) to rank %d (stream %u)\n", s.p.count,
                     s.p.type, s.p.self, s.op->stream->id, r.p.self, r.op->stream->id);
    std::memmove(reinterpret_cast<void*>(r.p.ptr), reinterpret_cast<const void*>(s.p.ptr), n);
    s.done = r.done = true;
    std::shared_ptr<Endpoint> keep = std::move(e.partner);  // both stay alive in their operations; the cycle breaks
    s.partner.reset();
    r.partner.reset();
}

void execute(Driver& d, Op& op) {
    if (config().trace > 1) std::fprintf(stderr, "cuda emulator: stream %u: %s (#%llu)\n", op.stream->id, op.kind, (unsigned long long)op.seq);
    for (const auto& e : op.endpoints)
        if (!e->done) transfer(d, *e);
    if (op.run) op.run();
    op.run = nullptr;  // drops captured buffers
    op.done = true;
}

// The operation is at the head of its stream's queue and may run as far as
// its stream and waits go (an NCCL group's peers may copy with it).
bool reached(const Op& op) {
    if (op.done) return true;
    if (op.stream->queue.empty() || op.stream->queue.front().get() != &op) return false;
    for (const auto& dep : op.deps)
        if (!dep->done) return false;
    return true;
}

// `head`, at the head of its queue, may run: its waits are done and, for an
// NCCL group, every copy still to run has a partner whose operation is reached.
bool ready(const Op& head) {
    for (const auto& dep : head.deps)
        if (!dep->done) return false;
    for (const auto& e : head.endpoints)
        if (!e->done && (!e->partner || !reached(*e->partner->op))) return false;
    return true;
}

using Need = std::unordered_map<Stream*, uint64_t>;  // run stream s up to sequence number need[s]

// What must run for `targets` to complete: the prefixes of their streams,
// those of the streams their waits depend on, and for an NCCL group the
// prefix before each partner's operation (which must be reached, not run).
Need needed(const std::vector<std::shared_ptr<Op>>& targets) {
    Need need;
    std::vector<std::pair<Op*, bool>> work;  // (op, whole): op and what precedes it, or (!whole) only the latter
    for (const auto& t : targets)
        if (!finished(t)) work.push_back({t.get(), true});
    while (!work.empty()) {
        auto [t, whole] = work.back();
        work.pop_back();
        if (t->done) continue;
        if (!whole)
            for (const auto& dep : t->deps)
                if (!dep->done) work.push_back({dep.get(), true});
        const uint64_t upto = whole ? t->seq : t->seq - 1;
        uint64_t& n = need[t->stream];
        if (upto <= n) continue;
        const uint64_t old = n;
        n = upto;
        for (const auto& op : t->stream->queue) {
            if (op->seq <= old) continue;
            if (op->seq > n) break;
            for (const auto& dep : op->deps)
                if (!dep->done) work.push_back({dep.get(), true});
            for (const auto& e : op->endpoints)
                if (!e->done && e->partner && e->partner->op != op.get()) work.push_back({e->partner->op, false});
        }
    }
    return need;
}

void wait_for_peers(Driver& d, const Need& need, Clock::time_point since);

// Runs queued work until every operation of `targets` has run (`all`: all
// work issued so far), and nothing more than they need: only the prefixes
// of streams they depend on. Among the streams whose head may run, the head
// issued last runs first. When what remains waits for NCCL work that no
// thread has issued yet, the driver's lock is released until another thread
// issues it (wait_for_peers).
void drain(Driver& d, std::vector<std::shared_ptr<Op>> targets, bool all) {
    if (all) {
        targets.clear();
        for (Stream* s : d.streams)
            if (s->last) targets.push_back(s->last);
    }
    Clock::time_point since = Clock::now();
    for (;;) {
        const Need need = needed(targets);
        bool ran = false;
        for (;;) {
            Stream* pick = nullptr;
            for (const auto& [s, n] : need) {
                if (s->queue.empty() || s->queue.front()->seq > n) continue;
                const Op& head = *s->queue.front();
                if (ready(head) && (!pick || head.seq > pick->queue.front()->seq)) pick = s;
            }
            if (!pick) break;
            std::shared_ptr<Op> op = std::move(pick->queue.front());
            pick->queue.pop_front();
            execute(d, *op);
            ran = true;
            progressed(d);
        }
        if (std::all_of(targets.begin(), targets.end(), finished)) break;
        if (ran) since = Clock::now();
        wait_for_peers(d, need, since);
    }
    // The host has seen these complete, and so everything ordered before them.
    for (const auto& t : targets)
        if (t) join(d.host, t->clock);
}

void drain_all(Driver& d) { drain(d, {}, true); }

// Nothing in `need` can run. If NCCL work that no thread has issued yet is
// missing, sleeps (releasing the driver's lock) until work is issued or runs;
// aborts with a message when it can never come: its peer left, every rank
// of the communicator waits the same way (a deadlock), or
// FRUGAL_EMU_NCCL_TIMEOUT seconds passed. Anything else stuck is a deadlock
// of NCCL groups (or an internal error).
void wait_for_peers(Driver& d, const Need& need, Clock::time_point since) {
    std::vector<const Endpoint*> missing;
    const Endpoint* unreached = nullptr;  // a partner issued but never reached
    for (const auto& [s, n] : need) {
        if (s->queue.empty() || s->queue.front()->seq > n) continue;
        for (const auto& e : s->queue.front()->endpoints) {
            if (e->done) continue;
            if (!e->partner) missing.push_back(e.get());
            else if (!unreached && !reached(*e->partner->op)) unreached = e.get();
        }
    }
    std::string msg;
    if (missing.empty()) {
        if (!unreached) fail("queued work waits on work that can never run (internal error)");
        msg = "nccl: deadlock: " + describe(*unreached) + " is matched by " + describe(*unreached->partner) +
              ", which its stream can never reach: the work before it waits (through streams, events or other transfers) "
              "for work that cannot run before the first";
        fail(msg.c_str());
    }
    for (const Endpoint* e : missing) {
        auto it = d.ranks.find({e->p.comm, e->p.peer});
        if (it != d.ranks.end() && it->second.left) {
            msg = "nccl: " + describe(*e) + " can never complete: rank " + std::to_string(e->p.peer) +
                  " destroyed or aborted its communicator without issuing the matching " + (e->p.send ? "receive" : "send");
            fail(msg.c_str());
        }
    }
    const std::thread::id me = std::this_thread::get_id();
    d.waiting[me] = d.generation;
    // The unmatched transfers of a communicator all of whose ranks' threads wait here, unchanged since.
    auto unmatched = [&d](uint64_t comm) {
        std::string list;
        for (const auto& [key, ch] : d.channels)
            if (std::get<0>(key) == comm)
                for (const auto& e : ch.unmatched) list += "\n  " + describe(*e);
        return list;
    };
    for (const Endpoint* e : missing) {
        bool all_wait = true;
        for (auto it = d.ranks.lower_bound({e->p.comm, INT_MIN}); it != d.ranks.end() && it->first.first == e->p.comm; ++it) {
            if (it->second.left) continue;
            auto w = d.waiting.find(it->second.owner);
            all_wait = all_wait && w != d.waiting.end() && w->second == d.generation;
        }
        if (all_wait) {
            msg = "nccl: deadlock: the thread of every rank waits for a transfer whose match no rank has issued:" + unmatched(e->p.comm);
            fail(msg.c_str());
        }
    }
    if (std::chrono::duration<double>(Clock::now() - since).count() > config().nccl_timeout) {
        msg = "nccl: waited over FRUGAL_EMU_NCCL_TIMEOUT seconds for the match of a transfer (no thread issued it):" +
              unmatched(missing.front()->p.comm);
        fail(msg.c_str());
    }
    d.progress.wait_for(d.m, std::chrono::seconds(1));
    d.waiting.erase(me);
}

std::map<uintptr_t, Alloc>::iterator find_alloc(Driver& d, uintptr_t p);

// The race check: an access conflicts with an earlier one of another stream
// to overlapping bytes, one of them a write, unless the earlier one is ordered
// before it (same stream, stream waits on event records, the legacy stream,
// or the host having seen it complete before issuing this one). Independent
// of the order in which the work then runs.
void check_races(Driver& d, const Op& op, const std::vector<Touch>& touches) {
    if (!config().races) return;
    for (const Touch& t : touches) {
        if (t.n == 0) continue;
        auto it = find_alloc(d, t.p);
        if (it == d.allocs.end()) continue;  // not device memory: copies were checked, kernels may pass anything
        Alloc& a = it->second;
        const uintptr_t lo = t.p, hi = t.p + std::min<size_t>(t.n, it->first + a.bytes - t.p);
        char msg[512];
        if (a.freed) {
            std::snprintf(msg, sizeof msg, "use after free: stream %u %s (#%llu) %s %zu bytes at offset %zu of an allocation whose free was already issued",
                          op.stream->id, op.kind, (unsigned long long)op.seq, t.write ? "writes" : "reads", size_t(hi - lo),
                          size_t(lo - it->first));
            fail(msg);
        }
        std::erase_if(a.accesses, [&](const Access& x) { return x.epoch <= at(d.host, x.slot); });
        for (const Access& x : a.accesses) {
            if (x.slot == op.stream->slot || !(t.write || x.write) || x.hi <= lo || hi <= x.lo) continue;
            if (at(op.clock, x.slot) >= x.epoch) continue;  // ordered after it
            std::snprintf(msg, sizeof msg,
                          "race: stream %u %s (#%llu) %s bytes [%zu, %zu) of a %zu-byte allocation that stream %u %s (#%llu) %s "
                          "[%zu, %zu), and no event, stream wait or host synchronization orders the two",
                          op.stream->id, op.kind, (unsigned long long)op.seq, t.write ? "writes" : "reads", size_t(lo - it->first),
                          size_t(hi - it->first), a.bytes, x.stream_id, x.kind, (unsigned long long)x.seq,
                          x.write ? "writes" : "reads", size_t(x.lo - it->first), size_t(x.hi - it->first));
            fail(msg);
        }
        // A later access of the same stream to the same bytes orders everything the earlier one would.
        std::erase_if(a.accesses, [&](const Access& x) {
            return x.slot == op.stream->slot && x.lo == lo && x.hi == hi && (t.write || !x.write);
        });
        a.accesses.push_back(Access{op.stream->slot, op.stream->id, at(op.clock, op.stream->slot), op.seq, lo, hi, t.write, op.kind});
    }
}

void match(Driver& d, const std::shared_ptr<Endpoint>& e);

// Queues `run` on `s` after `deps`, reading and writing `touches` (checked for
// races), with an NCCL group's `endpoints` (matched with their peers' now);
// in eager mode runs it (and anything before it) now.
std::shared_ptr<Op> enqueue(Driver& d, Stream* s, const char* kind, std::function<void()> run,
                            std::vector<std::shared_ptr<Op>> deps = {}, const std::vector<Touch>& touches = {},
                            std::vector<std::shared_ptr<Endpoint>> endpoints = {}) {
    auto op = std::make_shared<Op>();
    op->seq = ++d.seq;
    op->stream = s;
    op->kind = kind;
    op->run = std::move(run);
    // The legacy default stream waits for all earlier work of the blocking
    // streams, and their later work waits for it.
    if (s == &d.legacy) {
        for (Stream* o : d.streams)
            if (o != s && o->blocking && o->last) deps.push_back(o->last);
    } else if (s->blocking && d.legacy.last) {
        deps.push_back(d.legacy.last);
    }
    op->clock = d.host;
    if (s->last) join(op->clock, s->last->clock);
    for (const auto& dep : deps)
        if (dep) join(op->clock, dep->clock);
    if (op->clock.size() <= s->slot) op->clock.resize(s->slot + 1);
    op->clock[s->slot] = ++s->epoch;
    for (auto& dep : deps)
        if (!finished(dep)) op->deps.push_back(std::move(dep));
    check_races(d, *op, touches);
    for (const auto& e : endpoints) {
        e->op = op.get();
        match(d, e);
    }
    op->endpoints = std::move(endpoints);
    s->queue.push_back(op);
    s->last = op;
    if (!op->endpoints.empty()) progressed(d);
    if (config().eager) drain(d, {op}, false);
    return op;
}

// Pairs a send or receive with the oldest unmatched counterpart of its
// communicator and pair, or leaves it unmatched for the next one.
void match(Driver& d, const std::shared_ptr<Endpoint>& e) {
    const FrugalEmuP2p& p = e->p;
    Driver::Channel& ch = d.channels[{p.comm, p.send ? p.self : p.peer, p.send ? p.peer : p.self}];
    e->nth = p.send ? ++ch.sends : ++ch.recvs;
    std::string msg;
    if (auto it = d.ranks.find({p.comm, p.peer}); it != d.ranks.end() && it->second.left) {
        msg = "nccl: " + describe(*e) + " is issued after rank " + std::to_string(p.peer) +
              " destroyed or aborted its communicator: it can never complete";
        fail(msg.c_str());
    }
    if (ch.unmatched.empty() || ch.unmatched.front()->p.send == p.send) {
        ch.unmatched.push_back(e);
        return;
    }
    std::shared_ptr<Endpoint> other = std::move(ch.unmatched.front());
    ch.unmatched.pop_front();
    if (other->p.count != p.count || other->p.elem_bytes != p.elem_bytes || std::strcmp(other->p.type, p.type) != 0) {
        msg = "nccl: mismatched transfer: " + describe(*other) + " is matched (by issue order) with " + describe(*e) +
              ": NCCL needs the same count and type on both sides";
        fail(msg.c_str());
    }
    e->partner = other;
    other->partner = e;
}

// ---- device memory -----------------------------------------------------------

// The live allocation holding address p (its end excluded), or end().
std::map<uintptr_t, Alloc>::iterator find_alloc(Driver& d, uintptr_t p) {
    auto it = d.allocs.upper_bound(p);
    if (it == d.allocs.begin()) return d.allocs.end();
    --it;
    return p - it->first < it->second.bytes ? it : d.allocs.end();
}

// True when [p, p + n) lies inside one live allocation.
bool is_device(const Driver& d, CUdeviceptr p, size_t n) {
    auto it = d.allocs.upper_bound(static_cast<uintptr_t>(p));
    if (it == d.allocs.begin()) return false;
    --it;
    return p >= it->first && p - it->first <= it->second.bytes && n <= it->second.bytes - (p - it->first);
}

// Checked again when a queued copy runs: the memory may have been freed since it was issued.
void require_device(const Driver& d, CUdeviceptr p, size_t n, const char* what) {
    if (!is_device(d, p, n)) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "%s of %zu bytes at %#llx: not inside a live allocation when it ran (freed?)", what, n,
                      (unsigned long long)p);
        fail(msg);
    }
}

void release(Driver& d, CUdeviceptr p) {
    auto it = d.allocs.find(static_cast<uintptr_t>(p));
    if (it == d.allocs.end()) fail("cuMemFree of an address that is not a live allocation");
    void* m = reinterpret_cast<void*>(p);
    const size_t bytes = it->second.bytes;
    std::memset(m, 0xff, bytes);
    d.quarantine.emplace_back(m, bytes);
    d.quarantined += bytes;
    d.allocs.erase(it);
    // Freed blocks are not reused at once, so a late reader sees the poison rather than a new owner's data.
    while (d.quarantined > (size_t(256) << 20)) {
        std::free(d.quarantine.front().first);
        d.quarantined -= d.quarantine.front().second;
        d.quarantine.pop_front();
    }
}

CUresult copy_async(Driver& d, Stream* s, CUdeviceptr dst, CUdeviceptr src, size_t n, const char* kind) {
    if (!is_device(d, dst, n) || !is_device(d, src, n)) return CUDA_ERROR_INVALID_VALUE;
    enqueue(
        d, s, kind,
        [&d, dst, src, n, kind] {
            require_device(d, src, n, kind);
            require_device(d, dst, n, kind);
            std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
        },
        {}, {{src, n, false}, {dst, n, true}});
    return CUDA_SUCCESS;
}

CUresult copy_to_host(Driver& d, Stream* s, void* dst, CUdeviceptr src, size_t n) {
    if (!is_device(d, src, n)) return CUDA_ERROR_INVALID_VALUE;
    // A copy to pageable host memory returns once it has completed.
    auto op = enqueue(
        d, s, "memcpy DtoH",
        [&d, dst, src, n] {
            require_device(d, src, n, "memcpy DtoH");
            std::memcpy(dst, reinterpret_cast<const void*>(src), n);
        },
        {}, {{src, n, false}});
    drain(d, {op}, false);
    return CUDA_SUCCESS;
}

CUresult copy_from_host(Driver& d, Stream* s, CUdeviceptr dst, const void* src, size_t n) {
    if (!is_device(d, dst, n)) return CUDA_ERROR_INVALID_VALUE;
    // Staged at issue, as CUDA does with pageable memory before returning.
    auto bytes = std::make_shared<std::vector<unsigned char>>(static_cast<const unsigned char*>(src),
                                                              static_cast<const unsigned char*>(src) + n);
    enqueue(
        d, s, "memcpy HtoD",
        [&d, dst, bytes] {
            require_device(d, dst, bytes->size(), "memcpy HtoD");
            std::memcpy(reinterpret_cast<void*>(dst), bytes->data(), bytes->size());
        },
        {}, {{dst, n, true}});
    return CUDA_SUCCESS;
}

template <typename T>
CUresult memset_async(Driver& d, Stream* s, CUdeviceptr p, T v, size_t count) {
    if (!is_device(d, p, count * sizeof(T))) return CUDA_ERROR_INVALID_VALUE;
    enqueue(
        d, s, "memset",
        [&d, p, v, count] {
            require_device(d, p, count * sizeof(T), "memset");
            auto* x = reinterpret_cast<T*>(p);
            for (size_t i = 0; i < count; ++i) x[i] = v;
        },
        {}, {{p, count * sizeof(T), true}});
    return CUDA_SUCCESS;
}

const frugal_emu::Kernel* find(const char* name) {
    for (const auto* table : {frugal_emu::table_static_shared(), frugal_emu::table_extern_shared()})
        for (const frugal_emu::Kernel* k = table; k->name; ++k)
            if (std::strcmp(k->name, name) == 0) return k;
    return nullptr;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return config().error.empty() ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED; }
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
    const Config& c = config();
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 4; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = c.cc / 10; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = c.cc % 10; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = c.threads_per_sm; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X:
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y:
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = kDefaultSmem; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = c.smem_optin; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = c.smem_per_sm; break;
        case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK:
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: *v = 2; break;
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
CUresult cuDevicePrimaryCtxRelease(CUdevice) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain_all(d);
    return CUDA_SUCCESS;
}
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
CUresult cuCtxSynchronize() {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain_all(d);
    return CUDA_SUCCESS;
}
CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
CUresult cuCtxGetLimit(size_t* v, CUlimit) {
    *v = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetLimit(CUlimit, size_t) { return CUDA_SUCCESS; }
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* s, unsigned flags) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    auto* st = new Stream;
    st->id = d.next_stream_id++;
    st->slot = d.next_slot++;
    st->blocking = (flags & CU_STREAM_NON_BLOCKING) == 0;
    d.streams.push_back(st);
    *s = reinterpret_cast<CUstream>(st);
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
// Work still queued on the stream completes first (CUDA lets it finish after the call returns).
CUresult cuStreamDestroy(CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    Stream* st = resolve(d, s);
    if (st == &d.legacy || st == per_thread_stream) return CUDA_ERROR_INVALID_HANDLE;
    drain(d, {st->last}, false);
    std::erase(d.streams, st);
    delete st;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain(d, {resolve(d, s)->last}, false);
    return CUDA_SUCCESS;
}
CUresult cuStreamQuery(CUstream s) { return cuStreamSynchronize(s); }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    // On the record issued last before this call; later records do not change it.
    enqueue(d, resolve(d, s), "wait event", nullptr, {(*reinterpret_cast<EventHandle*>(e))->last});
    return CUDA_SUCCESS;
}
CUresult cuStreamIsCapturing(CUstream, CUstreamCaptureStatus* st) {
    *st = CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}
CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void* data) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    enqueue(d, resolve(d, s), "host function", [fn, data] { fn(data); });
    return CUDA_SUCCESS;
}

CUresult cuEventCreate(CUevent* e, unsigned flags) {
    auto ev = std::make_shared<Event>();
    ev->timing = (flags & CU_EVENT_DISABLE_TIMING) == 0;
    *e = reinterpret_cast<CUevent>(new EventHandle(std::move(ev)));
    return CUDA_SUCCESS;
}
// A record still queued keeps the event alive until it runs.
CUresult cuEventDestroy(CUevent e) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    delete reinterpret_cast<EventHandle*>(e);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent e, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    Event* ev = reinterpret_cast<EventHandle*>(e)->get();
    EventHandle keep = *reinterpret_cast<EventHandle*>(e);
    ev->last = enqueue(d, resolve(d, s), "record event", [keep] { keep->t = Clock::now(); });
    return CUDA_SUCCESS;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(CUevent e) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain(d, {(*reinterpret_cast<EventHandle*>(e))->last}, false);
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(CUevent e) { return cuEventSynchronize(e); }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    const Event& ea = **reinterpret_cast<EventHandle*>(a);
    const Event& eb = **reinterpret_cast<EventHandle*>(b);
    if (!ea.timing || !eb.timing || !ea.last || !eb.last) return CUDA_ERROR_INVALID_HANDLE;
    if (!ea.last->done || !eb.last->done) return CUDA_ERROR_NOT_READY;
    *ms = std::chrono::duration<float, std::milli>(eb.t - ea.t).count();
    return CUDA_SUCCESS;
}

// 256-byte aligned like cudaMalloc; zero bytes still gives a unique pointer.
// Fresh memory holds 0xff bytes (NaN), not zeros.
CUresult cuMemAlloc(CUdeviceptr* p, size_t bytes) {
    Driver& d = drv();
    void* m = std::aligned_alloc(256, ((bytes + 255) / 256 + 1) * 256);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    std::memset(m, 0xff, bytes);
    std::lock_guard<std::mutex> lock(d.m);
    d.allocs[reinterpret_cast<uintptr_t>(m)] = Alloc{bytes, false, {}};
    *p = reinterpret_cast<CUdeviceptr>(m);
    return CUDA_SUCCESS;
}
// Stream-ordered: another stream may use the memory once ordered after the allocation.
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    if (CUresult r = cuMemAlloc(p, bytes); r != CUDA_SUCCESS) return r;
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    enqueue(d, resolve(d, s), "allocation", nullptr, {}, {{*p, bytes, true}});
    return CUDA_SUCCESS;
}
// cuMemFree synchronizes the device first.
CUresult cuMemFree(CUdeviceptr p) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain_all(d);
    auto it = d.allocs.find(static_cast<uintptr_t>(p));
    if (it == d.allocs.end() || it->second.freed) return CUDA_ERROR_INVALID_VALUE;
    release(d, p);
    return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    auto it = d.allocs.find(static_cast<uintptr_t>(p));
    if (it == d.allocs.end() || it->second.freed) return CUDA_ERROR_INVALID_VALUE;
    // Every use on another stream must be ordered before the free.
    enqueue(d, resolve(d, s), "free", [&d, p] { release(d, p); }, {}, {{p, it->second.bytes, true}});
    it->second.freed = true;
    return CUDA_SUCCESS;
}
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
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::aligned_alloc(256, ((bytes + 255) / 256 + 1) * 256);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain_all(d);
    std::free(p);
    return CUDA_SUCCESS;
}

// Synchronous copies and memsets go on the legacy default stream. A copy to the
// host returns once done; one from the host once staged; device-to-device copies
// and memsets do not wait for the host (CUDA's "API synchronization behavior").
CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_from_host(d, &d.legacy, dst, src, n);
}
CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_from_host(d, resolve(d, s), dst, src, n);
}
CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_to_host(d, &d.legacy, dst, src, n);
}
CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_to_host(d, resolve(d, s), dst, src, n);
}
CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_async(d, &d.legacy, dst, src, n, "memcpy DtoD");
}
CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_async(d, resolve(d, s), dst, src, n, "memcpy DtoD");
}
CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext, CUdeviceptr src, CUcontext, size_t n, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return copy_async(d, resolve(d, s), dst, src, n, "memcpy peer");
}
CUresult cuMemsetD8(CUdeviceptr p, unsigned char v, size_t n) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return memset_async(d, &d.legacy, p, v, n);
}
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return memset_async(d, resolve(d, s), p, v, n);
}
CUresult cuMemsetD32(CUdeviceptr p, unsigned v, size_t n) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return memset_async(d, &d.legacy, p, v, n);
}
CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, CUstream s) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    return memset_async(d, resolve(d, s), p, v, n);
}

CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = reinterpret_cast<CUmodule>(new Module);
    return CUDA_SUCCESS;
}
// Launches still queued may use the module's functions: they run first.
CUresult cuModuleUnload(CUmodule m) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    drain_all(d);
    delete reinterpret_cast<Module*>(m);
    return CUDA_SUCCESS;
}
// One function object per module and name, with its own attributes.
CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    const frugal_emu::Kernel* k = find(name);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    auto& slot = reinterpret_cast<Module*>(m)->functions[name];
    if (!slot) slot.reset(new Function{k});
    *f = reinterpret_cast<CUfunction>(slot.get());
    return CUDA_SUCCESS;
}
CUresult cuModuleGetGlobal(CUdeviceptr*, size_t*, CUmodule, const char*) { return CUDA_ERROR_NOT_FOUND; }
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    auto* fn = reinterpret_cast<Function*>(f);
    switch (a) {
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
            // The emulator knows no kernel's static shared memory; it counts as 0.
            if (v < 0 || unsigned(v) > config().smem_optin) return CUDA_ERROR_INVALID_VALUE;
            if (fn->kernel->extern_smem && size_t(v) > fn->kernel->max_dynamic_smem)
                fail("a kernel's dynamic shared memory exceeds the emulator's buffer (kernels_extern.cpp)");
            fn->max_dynamic_smem = v;
            return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT:
            if (v < -1 || v > 100) return CUDA_ERROR_INVALID_VALUE;
            fn->carveout = v;
            return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;  // the others are read-only (or unsupported here)
    }
}
CUresult cuFuncSetCacheConfig(CUfunction, CUfunc_cache) { return CUDA_SUCCESS; }
CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction f) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    const auto* fn = reinterpret_cast<const Function*>(f);
    switch (a) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *v = fn->max_dynamic_smem; break;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: *v = fn->carveout; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION:
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *v = config().cc; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 32; break;
        // Static shared, constant and local memory are unknown to the emulator.
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, CUstream s, void** params, void** extra) {
    const auto* fn = reinterpret_cast<const Function*>(f);
    const frugal_emu::Kernel* k = fn->kernel;
    if (extra || !params) return CUDA_ERROR_INVALID_VALUE;
    if (size_t(bx) * by * bz > 1024 || bx > 1024 || by > 1024 || bz > 64) return CUDA_ERROR_INVALID_VALUE;
    if (!gx || !gy || !gz || !bx || !by || !bz || gy > 65535 || gz > 65535) return CUDA_ERROR_INVALID_VALUE;
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    // Beyond 48 KiB only after cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) raised this function's limit.
    if (smem > unsigned(fn->max_dynamic_smem)) return CUDA_ERROR_INVALID_VALUE;
    if (smem > 0 && !k->extern_smem)
        fail("a launch with dynamic shared memory of a kernel that declares none (kernels_static.cpp)");
    frugal_emu::Prepared prepared = k->prepare(*k, emu::Dim{gx, gy, gz}, emu::Dim{bx, by, bz}, smem, params);
    // A pointer argument may reach anything from it to the end of its allocation.
    std::vector<Touch> touches;
    for (const auto& a : prepared.pointers) {
        auto it = find_alloc(d, a.address);
        if (it != d.allocs.end()) touches.push_back({a.address, it->first + it->second.bytes - a.address, a.write});
    }
    Stream* st = resolve(d, s);
    enqueue(
        d, st, k->name,
        [run = std::move(prepared.run), k, st, gx, gy, gz, bx, by, bz, smem] {
            if (config().trace)
                std::fprintf(stderr, "cuda emulator: stream %u: %s grid (%u, %u, %u) block (%u, %u, %u) smem %u\n", st->id,
                             k->name, gx, gy, gz, bx, by, bz, smem);
            run();
        },
        {}, touches);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == CUDA_SUCCESS ? "no error" : "error in the CUDA emulator";
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
        default: *s = "CUDA_ERROR (emulator)";
    }
    return CUDA_SUCCESS;
}

// ---- the emulated NCCL's transfers (nccl_emu.h, nccl.cpp) ----------------------

CUresult frugal_emu_p2p_group(CUstream s, const FrugalEmuP2p* ops, size_t n) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    std::vector<Touch> touches;
    std::vector<std::shared_ptr<Endpoint>> endpoints;
    for (size_t i = 0; i < n; ++i) {
        const size_t bytes = ops[i].count * ops[i].elem_bytes;
        if (!is_device(d, ops[i].ptr, bytes)) return CUDA_ERROR_INVALID_VALUE;
        touches.push_back({ops[i].ptr, bytes, ops[i].send == 0});
        auto e = std::make_shared<Endpoint>();
        e->p = ops[i];
        endpoints.push_back(std::move(e));
    }
    // NCCL runs a group's transfers concurrently: a receive must not overlap another buffer of the group.
    for (size_t i = 0; i < n; ++i)
        for (size_t j = 0; j < n; ++j) {
            const uintptr_t a = ops[i].ptr, b = ops[j].ptr;
            const size_t na = ops[i].count * ops[i].elem_bytes, nb = ops[j].count * ops[j].elem_bytes;
            if (i != j && !ops[i].send && na && nb && a < b + nb && b < a + na) {
                char msg[256];
                std::snprintf(msg, sizeof msg, "nccl: a group on one stream receives from rank %d into bytes that its %s %s rank %d uses too",
                              ops[i].peer, ops[j].send ? "send" : "receive", ops[j].send ? "to" : "from", ops[j].peer);
                fail(msg);
            }
        }
    enqueue(d, resolve(d, s), "nccl group", nullptr, {}, touches, std::move(endpoints));
    return CUDA_SUCCESS;
}

void frugal_emu_p2p_join(uint64_t comm, int rank) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    d.ranks[{comm, rank}] = Driver::Rank{std::this_thread::get_id(), false};
}

void frugal_emu_p2p_leave(uint64_t comm, int rank, int destroy) {
    Driver& d = drv();
    std::lock_guard<std::mutex> lock(d.m);
    d.ranks[{comm, rank}].left = true;
    if (destroy)
        for (const auto& [key, ch] : d.channels)
            for (const auto& e : ch.unmatched)
                if (std::get<0>(key) == comm && e->p.self == rank) {
                    std::string msg = "nccl: ncclCommDestroy while " + describe(*e) +
                                      " is unmatched: NCCL would wait for it forever";
                    fail(msg.c_str());
                }
    progressed(d);
}

// cuda.h maps these names to their _v2 versions; cudarc may load either.
#undef cuDeviceGetUuid
#undef cuEventElapsedTime
CUresult cuDeviceGetUuid(CUuuid* u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }
CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime_v2(ms, a, b); }

}  // extern "C"
