/* Interface between the emulated kernel (msl.h, C++) and the fiber runtime (runtime.c, C).
   One fiber runs each GPU thread of a threadgroup; SIMD-group functions and barriers are
   rendezvous points: a lane records its value and yields; the last live lane to arrive
   computes every lane's result with the type-specific `complete` callback. */
#ifndef MSL_RUNTIME_H
#define MSL_RUNTIME_H

#ifdef __cplusplus
extern "C" {
#endif

#define MSL_SIMD_WIDTH 32
#define MSL_SLOT_BYTES 32 /* largest value a SIMD-group function moves: long4 */
#define MSL_MAX_THREADS 1024
#define MSL_TG_MEMORY 32768 /* threadgroup memory per threadgroup on Apple GPUs */

typedef struct msl_simd {
  int index;    /* simdgroup index in the threadgroup */
  int nlanes;   /* lanes that exist (the last simdgroup of a partial threadgroup has fewer) */
  int live;     /* lanes that have not returned */
  int arrived;  /* lanes waiting at the pending operation */
  unsigned active; /* mask of lanes taking part in the pending operation */
  const char* what;
  const char* file;
  int line, col;
  void (*complete)(struct msl_simd*);
  int arg[MSL_SIMD_WIDTH];
  unsigned char in[MSL_SIMD_WIDTH][MSL_SLOT_BYTES];
  unsigned char out[MSL_SIMD_WIDTH][MSL_SLOT_BYTES];
} msl_simd;

/* Values of the Metal kernel attributes for one thread. */
typedef struct msl_ids {
  unsigned tpig[3];   /* thread_position_in_grid */
  unsigned tpitg[3];  /* thread_position_in_threadgroup */
  unsigned tgpig[3];  /* threadgroup_position_in_grid */
  unsigned tptg[3];   /* threads_per_threadgroup (this threadgroup, smaller at the edge) */
  unsigned dtptg[3];  /* dispatch_threads_per_threadgroup */
  unsigned tgpg[3];   /* threadgroups_per_grid */
  unsigned grid[3];   /* threads_per_grid / grid_size */
  unsigned tiitg, lane, sgid, nsg, dnsg, qlane, qgid, nqg, dnqg;
} msl_ids;

/* Defined by the generated kernel translation unit: runs one GPU thread. */
void msl_thread_main(void* const* buffers, const msl_ids* ids);

const void* msl_simd_enter(const char* what, const char* file, int line, int col,
                           const void* value, int size, int arg,
                           void (*complete)(msl_simd*));
void msl_barrier(const char* what, const char* file, int line, int col);
void* msl_tg_alloc(int site, unsigned long size, unsigned long align, const char* name,
                   const char* file, int line);
void msl_fail(const char* fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

#ifdef __cplusplus
}
#endif
#endif
