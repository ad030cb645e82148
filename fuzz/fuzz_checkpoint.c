/*
 * fuzz_checkpoint.c - libFuzzer target for imp_checkpoint_load.
 *
 * The input is taken as the bytes of a checkpoint file and loaded into the
 * fixture (fixture.h).  Any status is a normal outcome; what must hold is
 * the loader's promise: no crash, no leak, a message on failure, and on
 * failure the stack's parameters, the optimizer's state, step count and
 * learning rate and the progress exactly as they were (compared bit for
 * bit against a copy).  On success every loaded value is finite.
 *
 * A random mutation almost never keeps the length field and the CRC-32
 * right, so after the raw load the input is loaded a second time with
 * both repaired (when it is long enough to hold them), once with the
 * optimizer and progress and once with the parameters alone; this carries
 * the fuzzer past the envelope into the decoder.
 *
 * The loader reads a path, and checkpoint.h has no loader from memory, so
 * the input goes through a temporary file, made at the start of each call
 * and removed at its end (a crash inside the call leaves it behind).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fixture.h"
#include "imp/status.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The envelope: the length field's offset and the checksum's size. */
enum { LENGTH_AT = 16, HEADER = 32, CRC_SIZE = 4 };

static char scratch_path[4096];
static int scratch_fd = -1;

static void scratch_remove(void)
{
  if (scratch_fd >= 0) {
    close(scratch_fd);
    unlink(scratch_path);
    scratch_fd = -1;
  }
}

/* Make the temporary file, in $TMPDIR, else in memory (/dev/shm)
 * where there is one, else in /tmp.  A file on disk that is truncated and
 * rewritten for every input makes the target ten times slower. */
static void scratch_open(void)
{
  const char *dir = getenv("TMPDIR");
  struct stat st;
  int n;

  if (dir == NULL || dir[0] == '\0') {
    int shm = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode);

    dir = shm ? "/dev/shm" : "/tmp";
  }
  n = snprintf(scratch_path, sizeof scratch_path,
               "%s/imp-fuzz-checkpoint-XXXXXX", dir);
  FUZZ_CHECK(n > 0 && (size_t)n < sizeof scratch_path, "TMPDIR too long");
  scratch_fd = mkstemp(scratch_path);
  FUZZ_CHECK(scratch_fd >= 0, "cannot make the temporary file");
}

/* Replace the temporary file's contents with size bytes at data. */
static void scratch_write(const uint8_t *data, size_t size)
{
  size_t done = 0;

  FUZZ_CHECK(ftruncate(scratch_fd, 0) == 0, "ftruncate");
  while (done < size) {
    ssize_t k = pwrite(scratch_fd, data + done, size - done, (off_t)done);

    FUZZ_CHECK(k > 0, "pwrite");
    done += (size_t)k;
  }
}

/* What a failing load must leave untouched. */
typedef struct snapshot {
  double params[16];
  double *state;
  size_t nstate;
  uint64_t steps;
  double lr;
  imp_progress progress;
} snapshot;

static void snapshot_take(fuzz_fixture *f, snapshot *s)
{
  memset(s, 0, sizeof *s);
  memcpy(s->params, imp_stack_params(f->stack), sizeof s->params);
  s->nstate = imp_optim_state_size(f->optim);
  s->state = malloc(s->nstate * sizeof(double));
  FUZZ_CHECK(s->state != NULL, "snapshot");
  memcpy(s->state, imp_optim_state(f->optim), s->nstate * sizeof(double));
  s->steps = imp_optim_steps(f->optim);
  s->lr = imp_optim_lr(f->optim);
  s->progress = f->progress;
}

/* Bit for bit: a NaN that was there must still be the same NaN. */
static int snapshot_same(fuzz_fixture *f, const snapshot *s)
{
  double lr = imp_optim_lr(f->optim);

  return memcmp(s->params, imp_stack_params(f->stack), sizeof s->params) == 0 &&
         memcmp(s->state, imp_optim_state(f->optim),
                s->nstate * sizeof(double)) == 0 &&
         s->steps == imp_optim_steps(f->optim) &&
         memcmp(&s->lr, &lr, sizeof lr) == 0 &&
         memcmp(&s->progress, &f->progress, sizeof f->progress) == 0;
}

static int all_finite(const double *a, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!isfinite(a[i]))
      return 0;
  return 1;
}

/* Load the temporary file into a fresh fixture and check the promise. */
static void load_and_check(int with_optim)
{
  fuzz_fixture f;
  snapshot before;
  int rc;

  fuzz_fixture_make(&f);
  snapshot_take(&f, &before);
  imp_clear_error();
  rc = imp_checkpoint_load(scratch_path, f.stack, with_optim ? f.optim : NULL,
                           with_optim ? &f.progress : NULL);

  FUZZ_CHECK(rc <= 0, "a status is zero or negative");
  if (rc != IMP_OK) {
    FUZZ_CHECK(imp_last_error()[0] != '\0', "a failed load says why");
    FUZZ_CHECK(snapshot_same(&f, &before),
               "a failed load changed the stack, optimizer or progress");
  } else {
    FUZZ_CHECK(all_finite(imp_stack_params(f.stack), 16),
               "loaded parameters are finite");
    FUZZ_CHECK(all_finite(imp_optim_state(f.optim), before.nstate),
               "loaded optimizer state is finite");
    FUZZ_CHECK(imp_optim_lr(f.optim) >= 0.0, "loaded rate is >= 0");
  }

  free(before.state);
  fuzz_fixture_free(&f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  uint8_t *fixed;
  uint32_t crc;

  scratch_open();

  /* The input as it is. */
  scratch_write(data, size);
  load_and_check(1);
  if (size < HEADER + CRC_SIZE) {
    scratch_remove();
    return 0;
  }

  /* The input with its length field and checksum made right. */
  fixed = malloc(size);
  FUZZ_CHECK(fixed != NULL, "copy of the input");
  memcpy(fixed, data, size);
  for (int i = 0; i < 8; i++)
    fixed[LENGTH_AT + i] = (uint8_t)((uint64_t)size >> (8 * i));
  FUZZ_CHECK(imp_crc32(fixed, size - CRC_SIZE, &crc) == IMP_OK, "crc32");
  for (int i = 0; i < 4; i++)
    fixed[size - CRC_SIZE + (size_t)i] = (uint8_t)(crc >> (8 * i));
  scratch_write(fixed, size);
  load_and_check(1);
  load_and_check(0);
  free(fixed);
  scratch_remove();
  return 0;
}
