/*
 * imp/checkpoint.h - saving and restoring a training run.
 *
 * A checkpoint holds a stack's parameters, optionally an optimizer's state
 * and the run's progress (its step counter and random generator), so that
 * an interrupted run resumes exactly where it stopped: the same weights,
 * moments and random stream, bit for bit.
 *
 * Saving is atomic.  The file is written to path.tmp.XXXXXX in the same
 * directory (mkstemp, mode 0600), flushed with fsync, renamed over path,
 * and the directory is synced, so that a crash at any moment leaves either
 * the previous checkpoint or the new one, never a mixture.  Loading reads
 * and verifies the whole file before touching anything: a file that is
 * truncated, corrupted, of another format version or written for another
 * architecture is refused with IMP_EFORMAT (IMP_EIO if it cannot be read),
 * the message says which, and the stack, optimizer and progress keep
 * their values.
 *
 * The format, version 1.  Integers are unsigned little-endian; a double
 * is its IEEE 754 binary64 bit pattern as a little-endian u64; a string is
 * a u32 byte count followed by that many bytes, without a terminating NUL.
 *
 *   offset  size  field
 *        0     8  magic: 89 49 4d 50 43 4b 50 54 (0x89 then "IMPCKPT")
 *        8     4  u32 format version: 1
 *       12     4  u32 flags: bit 0, an optimizer section follows the
 *                 parameters; bit 1, a progress section follows that;
 *                 the other bits are 0
 *       16     8  u64 length of the whole file in bytes, checksum included
 *       24     8  u64 R, the number of layer records
 *       32        R layer records, one per layer of the stack in depth-first
 *                 order (a nested stack's record, then its own layers'):
 *                   u32     depth: 0 for the stack's own layers, 1 for the
 *                           layers of a stack inside it, ...
 *                   string  the layer's kind ("dense", "stack", ...)
 *                   string  the layer's name
 *                   u64     the layer's parameter count
 *                 then
 *                   u64     N, the stack's parameter count
 *                   N       doubles: the parameters (imp_stack_params)
 *   optimizer section (flag bit 0):
 *                   string  the optimizer's kind ("sgd", "adam", "rmsprop")
 *                   u64     n, its parameter count
 *                   u64     t, its step count
 *                   double  its learning rate
 *                   u64     S, its state's length
 *                   S       doubles: the state (imp_optim_state)
 *   progress section (flag bit 1):
 *                   u64     the training step
 *                   4 u64   the random generator's state, s[0] to s[3]
 *   last       4  u32 CRC-32 of every byte before it (the IEEE 802.3
 *                 polynomial, reflected, 0xedb88320; initial value and
 *                 final xor 0xffffffff; CRC-32 of "123456789" is
 *                 0xcbf43926)
 *
 * A file matches a stack when its records agree with the stack's layers
 * in depth, kind, name and parameter count; an optimizer, when kind, n
 * and S agree.  Every double in a checkpoint is finite.
 */
#ifndef IMP_CHECKPOINT_H
#define IMP_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "imp/optim.h"
#include "imp/rng.h"
#include "imp/stack.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The format version this library writes and reads. */
#define IMP_CHECKPOINT_VERSION 1

/** Where a training run stands: its step counter and its generator. */
typedef struct imp_progress {
  uint64_t step;
  imp_rng rng;
} imp_progress;

/**
 * Save stack's parameters to path, atomically (see above).  optim and
 * progress may be NULL (not saved).  Nothing passed in is changed or
 * kept.  Returns IMP_EINVAL for NULL stack or path, IMP_ENONFINITE if a
 * value to save is NaN or Inf, IMP_EIO (the message gives the system's
 * reason) if the file cannot be written; on failure the file at path, if
 * any, is untouched and no temporary file is left behind.  The one
 * exception is a failed sync of the directory after the rename: the new
 * file is then in place but may not survive a crash, and the message says
 * "saved, but cannot sync the directory".
 */
int imp_checkpoint_save(const char *path, const imp_stack *stack,
                        const imp_optim *optim, const imp_progress *progress);

/**
 * Load the checkpoint at path into stack, and into optim and progress
 * unless they are NULL; the file must then hold those sections.  All three
 * are changed only on success.  Returns IMP_EIO if the file cannot be
 * opened or read, IMP_EFORMAT for a bad magic number, an unknown version,
 * a truncated file, a checksum mismatch, malformed contents or a different
 * architecture or optimizer.
 */
int imp_checkpoint_load(const char *path, imp_stack *stack, imp_optim *optim,
                        imp_progress *progress);

/** *crc = the CRC-32 of n bytes at data (the checkpoint's checksum). */
int imp_crc32(const void *data, size_t n, uint32_t *crc);

#ifdef __cplusplus
}
#endif

#endif /* IMP_CHECKPOINT_H */
