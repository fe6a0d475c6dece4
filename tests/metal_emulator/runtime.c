/* Fiber runtime of the Metal emulator: runs the threads of one threadgroup at a time as
   fibers on x86-64, one after another between rendezvous points (SIMD-group functions,
   threadgroup barriers), which makes every run deterministic. Compiled once and linked
   into every emulated kernel. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "msl_runtime.h"

#if !defined(__x86_64__)
#error "the Metal emulator's fibers are written for x86-64"
#endif

#define API __attribute__((visibility("default")))
#define STACK_BYTES (256 * 1024)
#define MAX_TG_SITES 64

enum { RUNNABLE, WAIT_SIMD, WAIT_BARRIER, DONE };

typedef struct fiber {
  void* sp; /* saved stack pointer while switched out */
  char* stack;
  int state;
  int tid;
  const char *wait_what, *wait_file;
  int wait_line;
  msl_ids ids;
} fiber;

static struct {
  fiber* fibers;
  char* stacks;
  size_t stack_span; /* guard page + stack */
  int cap, n, reverse;
  fiber* cur;
  void* sched_sp;
  void* const* buffers;
  msl_simd simd[MSL_MAX_THREADS / MSL_SIMD_WIDTH];
  int nsimd;
  /* threadgroup barrier */
  int bar_arrived, bar_tid, bar_line, bar_col, exited;
  const char *bar_file, *bar_what;
  /* threadgroup memory */
  unsigned char* arena;
  size_t arena_used;
  void* sites[MAX_TG_SITES];
  /* errors */
  int failed;
  char* err;
  int errlen;
  sigjmp_buf fault_jump;
  void* fault_addr;
  int fault_sig;
} R;

/* ---- context switch: saves callee-saved registers on the old stack, swaps stacks ---- */
void msl_ctx_switch(void** save_sp, void* new_sp) __attribute__((visibility("hidden")));
void msl_fiber_entry(void) __attribute__((visibility("hidden")));
void msl_fiber_main(fiber* f) __attribute__((visibility("hidden"), used, noreturn));
__asm__(
    ".text\n"
    ".globl msl_ctx_switch\n.hidden msl_ctx_switch\n.type msl_ctx_switch,@function\n"
    "msl_ctx_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size msl_ctx_switch, .-msl_ctx_switch\n"
    ".globl msl_fiber_entry\n.hidden msl_fiber_entry\n.type msl_fiber_entry,@function\n"
    "msl_fiber_entry:\n" /* first switch into a fiber lands here with the fiber in rbx */
    "  movq %rbx, %rdi\n"
    "  call msl_fiber_main\n"
    "  ud2\n"
    ".size msl_fiber_entry, .-msl_fiber_entry\n");

static void fiber_init(fiber* f) {
  /* After the 6 pops and `ret` into msl_fiber_entry, rsp must be 16-byte aligned so that
     its `call` leaves the callee with the ABI's alignment. */
  uintptr_t top = ((uintptr_t)f->stack + STACK_BYTES - 64) & ~(uintptr_t)15;
  void** sp = (void**)top;
  *--sp = (void*)msl_fiber_entry;
  *--sp = 0;        /* rbp */
  *--sp = (void*)f; /* rbx */
  *--sp = 0;        /* r12 */
  *--sp = 0;        /* r13 */
  *--sp = 0;        /* r14 */
  *--sp = 0;        /* r15 */
  f->sp = sp;
  f->state = RUNNABLE;
}

static void yield(void) { msl_ctx_switch(&R.cur->sp, R.sched_sp); }

static int where(char* buf, int len) {
  if (!R.cur) return snprintf(buf, len, "%s", "");
  const msl_ids* d = &R.cur->ids;
  return snprintf(buf, len, "threadgroup (%u,%u,%u), thread %u (lane %u of simdgroup %u): ",
                  d->tgpig[0], d->tgpig[1], d->tgpig[2], d->tiitg, d->lane, d->sgid);
}

void msl_fail(const char* fmt, ...) {
  if (!R.failed) {
    int k = where(R.err, R.errlen);
    va_list ap;
    va_start(ap, fmt);
    if (k < R.errlen) vsnprintf(R.err + k, R.errlen - k, fmt, ap);
    va_end(ap);
    R.failed = 1;
  }
  if (R.cur) yield(); /* the scheduler sees `failed` and abandons the threadgroup */
  __builtin_trap();
}

static fiber* fiber_of(msl_simd* s, int lane) { return &R.fibers[s->index * MSL_SIMD_WIDTH + lane]; }

static void simd_complete(msl_simd* s) {
  s->complete(s);
  for (int l = 0; l < s->nlanes; l++)
    if ((s->active >> l) & 1u) fiber_of(s, l)->state = RUNNABLE;
  s->arrived = 0;
}

const void* msl_simd_enter(const char* what, const char* file, int line, int col,
                           const void* value, int size, int arg, void (*complete)(msl_simd*)) {
  fiber* f = R.cur;
  int lane = f->tid % MSL_SIMD_WIDTH;
  msl_simd* s = &R.simd[f->tid / MSL_SIMD_WIDTH];
  if (s->arrived == 0) {
    s->what = what, s->file = file, s->line = line, s->col = col;
    s->complete = complete;
    s->active = 0;
  } else if (s->line != line || s->col != col || strcmp(s->file, file) || strcmp(s->what, what)) {
    int other = __builtin_ctz(s->active);
    msl_fail("lanes of a simdgroup meet at different SIMD-group functions: lane %d waits at %s "
             "(%s:%d:%d) while lane %d reached %s (%s:%d:%d); SIMD-group functions in divergent "
             "control flow are not supported",
             other, s->what, s->file, s->line, s->col, lane, what, file, line, col);
  }
  if (size) memcpy(s->in[lane], value, size);
  s->arg[lane] = arg;
  s->active |= 1u << lane;
  if (++s->arrived == s->live) {
    simd_complete(s);
  } else {
    f->state = WAIT_SIMD;
    f->wait_what = what, f->wait_file = file, f->wait_line = line;
    yield();
  }
  return s->out[lane];
}

void msl_barrier(const char* what, const char* file, int line, int col) {
  fiber* f = R.cur;
  if (R.exited)
    msl_fail("%s at %s:%d: %d thread(s) of this threadgroup already returned; every thread of a "
             "threadgroup must reach each barrier",
             what, file, line, R.exited);
  if (R.bar_arrived == 0) {
    R.bar_what = what, R.bar_file = file, R.bar_line = line, R.bar_col = col;
    R.bar_tid = f->tid;
  } else if (R.bar_line != line || R.bar_col != col || strcmp(R.bar_file, file) || strcmp(R.bar_what, what)) {
    msl_fail("divergent barriers: thread %d waits at %s (%s:%d:%d) while this thread reached %s "
             "(%s:%d:%d)",
             R.bar_tid, R.bar_what, R.bar_file, R.bar_line, R.bar_col, what, file, line, col);
  }
  if (++R.bar_arrived == R.n) {
    R.bar_arrived = 0;
    for (int i = 0; i < R.n; i++)
      if (R.fibers[i].state == WAIT_BARRIER) R.fibers[i].state = RUNNABLE;
  } else {
    f->state = WAIT_BARRIER;
    f->wait_what = what, f->wait_file = file, f->wait_line = line;
    yield();
  }
}

void* msl_tg_alloc(int site, unsigned long size, unsigned long align, const char* name,
                   const char* file, int line) {
  if (site < 0 || site >= MAX_TG_SITES) msl_fail("too many threadgroup declarations");
  if (!R.sites[site]) {
    size_t off = (R.arena_used + align - 1) & ~(size_t)(align - 1);
    if (off + size > MSL_TG_MEMORY)
      msl_fail("threadgroup memory: '%s' (%s:%d) takes %lu bytes, bringing the threadgroup's "
               "total to %lu bytes; Metal allows %d bytes per threadgroup",
               name, file, line, size, (unsigned long)(off + size), MSL_TG_MEMORY);
    R.sites[site] = R.arena + off;
    R.arena_used = off + size;
  }
  return R.sites[site];
}

void msl_fiber_main(fiber* f) {
  msl_thread_main(R.buffers, &f->ids);
  f->state = DONE;
  R.exited++;
  if (R.bar_arrived)
    msl_fail("returned while %d thread(s) wait at %s (%s:%d); every thread of a threadgroup must "
             "reach each barrier",
             R.bar_arrived, R.bar_what, R.bar_file, R.bar_line);
  msl_simd* s = &R.simd[f->tid / MSL_SIMD_WIDTH];
  s->live--;
  if (s->arrived && s->arrived == s->live) simd_complete(s); /* lanes that return drop out */
  yield();
  __builtin_trap();
}

/* ---- memory ---- */
static size_t page(void) { return (size_t)sysconf(_SC_PAGESIZE); }
static size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

/* A buffer whose end touches an inaccessible page, so reads or writes past it fault. */
API void* msl_alloc_guarded(size_t nbytes) {
  size_t used = round_up(nbytes ? nbytes : 1, 16), span = round_up(used, page());
  char* base = mmap(0, span + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return 0;
  mprotect(base + span, page(), PROT_NONE);
  return base + span - used;
}

API void msl_free_guarded(void* p, size_t nbytes) {
  size_t used = round_up(nbytes ? nbytes : 1, 16), span = round_up(used, page());
  munmap((char*)p + used - span, span + page());
}

static int ensure_capacity(int n) {
  if (!R.arena) {
    R.arena = msl_alloc_guarded(MSL_TG_MEMORY);
    if (!R.arena) return 0;
    memset(R.arena, 0xff, MSL_TG_MEMORY);
  }
  if (n <= R.cap) return 1;
  if (R.stacks) munmap(R.stacks, R.stack_span * R.cap);
  R.stack_span = STACK_BYTES + page();
  R.stacks = mmap(0, R.stack_span * n, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  static fiber fibers[MSL_MAX_THREADS];
  if (R.stacks == MAP_FAILED) return R.stacks = 0, R.cap = 0;
  for (int i = 0; i < n; i++) {
    mprotect(R.stacks + i * R.stack_span, page(), PROT_NONE); /* overflow guard */
    fibers[i].stack = R.stacks + i * R.stack_span + page();
  }
  R.fibers = fibers;
  R.cap = n;
  return 1;
}

/* ---- scheduler ---- */
static void deadlock(void) {
  int k = snprintf(R.err, R.errlen, "deadlock: no thread can proceed;");
  for (int i = 0; i < R.n && k < R.errlen; i++) {
    fiber* f = &R.fibers[i];
    if (f->state == DONE) continue;
    int seen = 0;
    for (int j = 0; j < i && !seen; j++)
      seen = R.fibers[j].state != DONE && R.fibers[j].wait_line == f->wait_line &&
             R.fibers[j].wait_what == f->wait_what;
    if (seen) continue;
    int count = 0;
    for (int j = i; j < R.n; j++)
      count += R.fibers[j].state != DONE && R.fibers[j].wait_line == f->wait_line &&
               R.fibers[j].wait_what == f->wait_what;
    k += snprintf(R.err + k, R.errlen - k, " %d thread(s) wait at %s (%s:%d);", count,
                  f->wait_what, f->wait_file, f->wait_line);
  }
  R.failed = 1;
}

static int run_threadgroup(void) {
  for (;;) {
    int progress = 0, alive = 0;
    for (int k = 0; k < R.n; k++) {
      fiber* f = &R.fibers[R.reverse ? R.n - 1 - k : k];
      if (f->state == RUNNABLE) {
        R.cur = f;
        msl_ctx_switch(&R.sched_sp, f->sp);
        R.cur = 0;
        progress = 1;
        if (R.failed) return 1;
      }
      alive += f->state != DONE;
    }
    if (!alive) return 0;
    if (!progress) return deadlock(), 1;
  }
}

static void on_fault(int sig, siginfo_t* info, void* ctx) {
  (void)ctx;
  R.fault_sig = sig;
  R.fault_addr = info->si_addr;
  siglongjmp(R.fault_jump, 1);
}

static unsigned cdiv(unsigned a, unsigned b) { return (a + b - 1) / b; }

/* Runs the whole grid. grid counts threads and tg is the requested threadgroup size, as
   MLX's dispatch_threads: the threadgroups at the far edges are smaller.
   Returns 0, 1 (kernel error in err) or 2 (memory fault at *fault_addr, context in err). */
API int msl_run(void* const* buffers, const unsigned* grid, const unsigned* tg, int reverse,
                char* err, int errlen, uintptr_t* fault_addr) {
  unsigned d[3], ntg[3];
  for (int i = 0; i < 3; i++) d[i] = tg[i] < grid[i] ? tg[i] : grid[i], ntg[i] = cdiv(grid[i], d[i]);
  memset(err, 0, errlen);
  R.err = err, R.errlen = errlen, R.failed = 0, R.reverse = reverse, R.buffers = buffers;
  if (!ensure_capacity(d[0] * d[1] * d[2])) return snprintf(err, errlen, "out of memory"), 1;

  struct sigaction act, old_segv, old_bus, old_fpe;
  memset(&act, 0, sizeof act);
  act.sa_sigaction = on_fault;
  act.sa_flags = SA_SIGINFO | SA_ONSTACK;
  static char alt[64 * 1024];
  stack_t ss = {.ss_sp = alt, .ss_size = sizeof alt, .ss_flags = 0}, old_ss;
  sigaltstack(&ss, &old_ss);
  sigaction(SIGSEGV, &act, &old_segv);
  sigaction(SIGBUS, &act, &old_bus);
  sigaction(SIGFPE, &act, &old_fpe);

  volatile int rc = 0;
  if (sigsetjmp(R.fault_jump, 1)) {
    char* a = (char*)R.fault_addr;
    int k = where(err, errlen);
    if (R.fault_sig == SIGFPE)
      snprintf(err + k, errlen - k, "arithmetic fault (integer division by zero?)");
    else if (a >= R.stacks && a < R.stacks + R.stack_span * R.cap &&
             (size_t)(a - R.stacks) % R.stack_span < page())
      snprintf(err + k, errlen - k, "stack overflow (more than %d KB of thread memory)",
               STACK_BYTES / 1024);
    else if (a >= (char*)R.arena + MSL_TG_MEMORY && a < (char*)R.arena + MSL_TG_MEMORY + page())
      snprintf(err + k, errlen - k, "threadgroup memory accessed past its %d bytes", MSL_TG_MEMORY);
    else
      snprintf(err + k, errlen - k, "invalid memory access at %p", R.fault_addr);
    *fault_addr = (uintptr_t)R.fault_addr;
    R.cur = 0;
    rc = 2;
  } else {
    for (unsigned z = 0; z < ntg[2] && !rc; z++)
      for (unsigned y = 0; y < ntg[1] && !rc; y++)
        for (unsigned x = 0; x < ntg[0] && !rc; x++) {
          unsigned pos[3] = {x, y, z}, a[3];
          for (int i = 0; i < 3; i++) {
            unsigned left = grid[i] - pos[i] * d[i];
            a[i] = left < d[i] ? left : d[i];
          }
          R.n = a[0] * a[1] * a[2];
          R.nsimd = cdiv(R.n, MSL_SIMD_WIDTH);
          for (int t = 0; t < R.n; t++) {
            fiber* f = &R.fibers[t];
            msl_ids* id = &f->ids;
            unsigned loc[3] = {t % a[0], t / a[0] % a[1], t / (a[0] * a[1])};
            for (int i = 0; i < 3; i++) {
              id->tpitg[i] = loc[i], id->tgpig[i] = pos[i], id->tptg[i] = a[i];
              id->dtptg[i] = d[i], id->tgpg[i] = ntg[i], id->grid[i] = grid[i];
              id->tpig[i] = pos[i] * d[i] + loc[i];
            }
            id->tiitg = t, id->lane = t % MSL_SIMD_WIDTH, id->sgid = t / MSL_SIMD_WIDTH;
            id->nsg = R.nsimd, id->dnsg = cdiv(d[0] * d[1] * d[2], MSL_SIMD_WIDTH);
            id->qlane = t % 4, id->qgid = t / 4, id->nqg = cdiv(R.n, 4);
            id->dnqg = cdiv(d[0] * d[1] * d[2], 4);
            f->tid = t;
            fiber_init(f);
          }
          for (int s = 0; s < R.nsimd; s++) {
            msl_simd* m = &R.simd[s];
            m->index = s, m->arrived = 0, m->active = 0;
            m->nlanes = m->live = s < R.nsimd - 1 ? MSL_SIMD_WIDTH : R.n - s * MSL_SIMD_WIDTH;
          }
          R.bar_arrived = 0, R.exited = 0;
          memset(R.arena, 0xff, R.arena_used); /* NaN in every float type */
          R.arena_used = 0;
          memset(R.sites, 0, sizeof R.sites);
          rc = run_threadgroup();
        }
  }
  sigaction(SIGSEGV, &old_segv, 0);
  sigaction(SIGBUS, &old_bus, 0);
  sigaction(SIGFPE, &old_fpe, 0);
  sigaltstack(&old_ss, 0);
  return rc;
}

/* libgcc 12 lacks the float -> bfloat16 conversion clang emits (bf16 is returned in xmm0, as
   libgcc 13 does): round to nearest even, NaN stays NaN. */
__attribute__((weak, visibility("hidden"))) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40)
                                                : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  __bf16 r;
  memcpy(&r, &h, 2);
  return r;
}

__attribute__((weak, visibility("hidden"))) __bf16 __truncdfbf2(double x) {
  return __truncsfbf2((float)x); /* double rounding; Metal has no double */
}
