/*
 * core/checkpoint.c - the checkpoint format of imp/checkpoint.h: an
 * in-memory encoder and a bounds-checked decoder, an atomic save
 * (temporary file, fsync, rename, directory fsync) and a load that
 * verifies everything before it commits.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/internal.h"
#include "imp/checkpoint.h"

static const unsigned char ckpt_magic[8] = {0x89, 'I', 'M', 'P',
                                            'C',  'K', 'P', 'T'};

enum {
  CKPT_HAS_OPTIM = 1u << 0,
  CKPT_HAS_PROGRESS = 1u << 1,
  CKPT_HEADER = 32, /* magic, version, flags, length, record count */
  CKPT_CRC = 4,
  CKPT_MAX_STRING = 4096
};

/* ------------------------------------------------------------------ */
/* CRC-32. */

int imp_crc32(const void *data, size_t n, uint32_t *crc)
{
  const unsigned char *p = data;
  uint32_t table[256], c = 0xffffffffu;

  if (crc == NULL || (data == NULL && n > 0))
    return imp__fail(IMP_EINVAL, "crc32: NULL argument");

  /* The byte table of the reflected polynomial; 2 kB of work per call. */
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t r = i;

    for (int k = 0; k < 8; k++)
      r = (r & 1u) ? 0xedb88320u ^ (r >> 1) : r >> 1;
    table[i] = r;
  }

  for (size_t i = 0; i < n; i++)
    c = table[(c ^ p[i]) & 0xffu] ^ (c >> 8);
  *crc = c ^ 0xffffffffu;
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* The layer records: a stack's architecture, depth first. */

typedef struct ckpt_record {
  uint32_t depth;
  const char *kind; /* borrowed from the layer or the file buffer */
  size_t kind_len;
  const char *name;
  size_t name_len;
  uint64_t nparams;
} ckpt_record;

typedef struct ckpt_records {
  ckpt_record *r;
  size_t n, cap;
} ckpt_records;

static int records_push(ckpt_records *rs, const ckpt_record *rec)
{
  if (rs->n == rs->cap) {
    size_t cap = rs->cap > 0 ? 2 * rs->cap : 16;
    ckpt_record *r = realloc(rs->r, cap * sizeof *r);

    if (r == NULL)
      return imp__fail(IMP_ENOMEM, "checkpoint: %zu layer records", cap);
    rs->r = r;
    rs->cap = cap;
  }
  rs->r[rs->n++] = *rec;
  return IMP_OK;
}

static int records_of_stack(const imp_stack *s, uint32_t depth,
                            ckpt_records *rs)
{
  for (size_t k = 0; k < imp_stack_nlayers(s); k++) {
    const imp_layer *l = imp_stack_layer(s, k);
    const imp_stack *inner = imp_stack_from_layer(l);
    ckpt_record rec = {depth,
                       imp_layer_kind(l),
                       strlen(imp_layer_kind(l)),
                       imp_layer_name(l),
                       strlen(imp_layer_name(l)),
                       imp_layer_nparams(l)};

    IMP__TRY(records_push(rs, &rec));
    if (inner != NULL)
      IMP__TRY(records_of_stack(inner, depth + 1, rs));
  }
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* The encoder: a growing byte buffer; a failed growth sticks. */

typedef struct ckpt_writer {
  unsigned char *buf;
  size_t len, cap;
  int failed;
} ckpt_writer;

static void put_bytes(ckpt_writer *w, const void *p, size_t n)
{
  if (w->failed)
    return;
  if (n > w->cap - w->len) {
    size_t cap = w->cap > 0 ? w->cap : 256;
    unsigned char *b;

    while (cap - w->len < n && cap < SIZE_MAX / 2)
      cap *= 2;
    b = cap - w->len >= n ? realloc(w->buf, cap) : NULL;
    if (b == NULL) {
      w->failed = 1;
      return;
    }
    w->buf = b;
    w->cap = cap;
  }
  memcpy(w->buf + w->len, p, n);
  w->len += n;
}

static void put_u32(ckpt_writer *w, uint32_t v)
{
  unsigned char b[4];

  for (int i = 0; i < 4; i++)
    b[i] = (unsigned char)(v >> (8 * i));
  put_bytes(w, b, 4);
}

static void put_u64(ckpt_writer *w, uint64_t v)
{
  unsigned char b[8];

  for (int i = 0; i < 8; i++)
    b[i] = (unsigned char)(v >> (8 * i));
  put_bytes(w, b, 8);
}

static void put_f64(ckpt_writer *w, double v)
{
  uint64_t bits;

  memcpy(&bits, &v, sizeof bits);
  put_u64(w, bits);
}

static void put_string(ckpt_writer *w, const char *s, size_t n)
{
  put_u32(w, (uint32_t)n);
  put_bytes(w, s, n);
}

/* Overwrite 8 bytes at offset with v (the length field). */
static void patch_u64(ckpt_writer *w, size_t offset, uint64_t v)
{
  for (int i = 0; i < 8; i++)
    w->buf[offset + i] = (unsigned char)(v >> (8 * i));
}

/* ------------------------------------------------------------------ */
/* The decoder: reads past the end set a flag instead of overrunning. */

typedef struct ckpt_reader {
  const unsigned char *buf;
  size_t len, pos;
  int overrun;
} ckpt_reader;

static const unsigned char *take(ckpt_reader *r, size_t n)
{
  const unsigned char *p;

  if (r->overrun || n > r->len - r->pos) {
    r->overrun = 1;
    return NULL;
  }
  p = r->buf + r->pos;
  r->pos += n;
  return p;
}

static uint32_t get_u32(ckpt_reader *r)
{
  const unsigned char *p = take(r, 4);
  uint32_t v = 0;

  for (int i = 0; p != NULL && i < 4; i++)
    v |= (uint32_t)p[i] << (8 * i);
  return v;
}

static uint64_t get_u64(ckpt_reader *r)
{
  const unsigned char *p = take(r, 8);
  uint64_t v = 0;

  for (int i = 0; p != NULL && i < 8; i++)
    v |= (uint64_t)p[i] << (8 * i);
  return v;
}

static double get_f64(ckpt_reader *r)
{
  uint64_t bits = get_u64(r);
  double v;

  memcpy(&v, &bits, sizeof v);
  return v;
}

/* A string: a borrowed pointer into the buffer and its length. */
static const char *get_string(ckpt_reader *r, size_t *n)
{
  uint32_t len = get_u32(r);

  if (len > CKPT_MAX_STRING) {
    r->overrun = 1;
    return NULL;
  }
  *n = len;
  return (const char *)take(r, len);
}

/* n doubles into a new array (NULL on overrun or no memory; *nomem says
 * which). */
static double *get_doubles(ckpt_reader *r, uint64_t n, int *nomem)
{
  double *a;

  *nomem = 0;
  if (r->overrun || n > (r->len - r->pos) / 8) {
    r->overrun = 1;
    return NULL;
  }
  a = imp__dalloc((size_t)n);
  if (a == NULL) {
    *nomem = 1;
    return NULL;
  }
  for (uint64_t i = 0; i < n; i++)
    a[i] = get_f64(r);
  return a;
}

/* ------------------------------------------------------------------ */
/* Encoding a checkpoint in memory. */

static int encode(const imp_stack *stack, const imp_optim *optim,
                  const imp_progress *progress, ckpt_writer *w)
{
  const double *params = imp_stack_params((imp_stack *)stack);
  size_t nparams = imp_stack_nparams(stack);
  ckpt_records rs = {NULL, 0, 0};
  uint32_t flags = 0, crc;
  int rc;

  /* Refuse values that no load would accept. */
  if (!imp__all_finite(params, nparams))
    return imp__fail(IMP_ENONFINITE, "checkpoint: NaN or Inf in the "
                                     "parameters");
  if (optim != NULL && (!imp__all_finite(imp_optim_state((imp_optim *)optim),
                                         imp_optim_state_size(optim)) ||
                        !isfinite(imp_optim_lr(optim))))
    return imp__fail(IMP_ENONFINITE,
                     "checkpoint: NaN or Inf in the %s "
                     "optimizer's state",
                     imp_optim_name(optim));
  rc = records_of_stack(stack, 0, &rs);
  if (rc != IMP_OK) {
    free(rs.r);
    return rc;
  }

  /* Header; the length is patched in at the end. */
  flags |= optim != NULL ? CKPT_HAS_OPTIM : 0u;
  flags |= progress != NULL ? CKPT_HAS_PROGRESS : 0u;
  put_bytes(w, ckpt_magic, sizeof ckpt_magic);
  put_u32(w, IMP_CHECKPOINT_VERSION);
  put_u32(w, flags);
  put_u64(w, 0);
  put_u64(w, rs.n);

  /* Architecture, then parameters. */
  for (size_t i = 0; i < rs.n; i++) {
    put_u32(w, rs.r[i].depth);
    put_string(w, rs.r[i].kind, rs.r[i].kind_len);
    put_string(w, rs.r[i].name, rs.r[i].name_len);
    put_u64(w, rs.r[i].nparams);
  }
  free(rs.r);
  put_u64(w, nparams);
  for (size_t i = 0; i < nparams; i++)
    put_f64(w, params[i]);

  /* Optional sections. */
  if (optim != NULL) {
    const double *state = imp_optim_state((imp_optim *)optim);
    size_t nstate = imp_optim_state_size(optim);

    put_string(w, imp_optim_name(optim), strlen(imp_optim_name(optim)));
    put_u64(w, imp_optim_size(optim));
    put_u64(w, imp_optim_steps(optim));
    put_f64(w, imp_optim_lr(optim));
    put_u64(w, nstate);
    for (size_t i = 0; i < nstate; i++)
      put_f64(w, state[i]);
  }
  if (progress != NULL) {
    put_u64(w, progress->step);
    for (int i = 0; i < 4; i++)
      put_u64(w, progress->rng.s[i]);
  }

  /* Length and checksum. */
  if (w->failed)
    return imp__fail(IMP_ENOMEM, "checkpoint: encoding buffer");
  patch_u64(w, 16, (uint64_t)w->len + CKPT_CRC);
  imp_crc32(w->buf, w->len, &crc);
  put_u32(w, crc);
  if (w->failed)
    return imp__fail(IMP_ENOMEM, "checkpoint: encoding buffer");
  return IMP_OK;
}

/* ------------------------------------------------------------------ */
/* Saving. */

static int write_all(int fd, const unsigned char *p, size_t n)
{
  while (n > 0) {
    ssize_t k = write(fd, p, n);

    if (k < 0 && errno == EINTR)
      continue;
    if (k <= 0)
      return -1;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/* Record an I/O failure with the system's reason for errno. */
static int fail_io(const char *what, const char *path, int err)
{
  char reason[128];

  if (strerror_r(err, reason, sizeof reason) != 0)
    snprintf(reason, sizeof reason, "errno %d", err);
  return imp__fail(IMP_EIO, "checkpoint: %s %s: %s", what, path, reason);
}

/* fsync the directory that holds path, so the rename itself is durable. */
static int sync_parent(const char *path)
{
  char *copy = strdup(path);
  int fd, rc = IMP_OK;

  if (copy == NULL)
    return imp__fail(IMP_ENOMEM, "checkpoint: path");
  fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
  if (fd < 0 || fsync(fd) != 0)
    rc = fail_io("saved, but cannot sync the directory of", path, errno);
  if (fd >= 0)
    close(fd);
  free(copy);
  return rc;
}

int imp_checkpoint_save(const char *path, const imp_stack *stack,
                        const imp_optim *optim, const imp_progress *progress)
{
  ckpt_writer w = {NULL, 0, 0, 0};
  char *tmp = NULL;
  int fd = -1, rc;

  if (path == NULL || stack == NULL)
    return imp__fail(IMP_EINVAL, "checkpoint_save: NULL argument");

  /* The whole file in memory first. */
  rc = encode(stack, optim, progress, &w);
  if (rc != IMP_OK)
    goto done;

  /* A temporary file beside the target, written and flushed. */
  tmp = malloc(strlen(path) + sizeof ".tmp.XXXXXX");
  if (tmp == NULL) {
    rc = imp__fail(IMP_ENOMEM, "checkpoint: path");
    goto done;
  }
  strcpy(tmp, path);
  strcat(tmp, ".tmp.XXXXXX");
  fd = mkstemp(tmp);
  if (fd < 0) {
    rc = fail_io("cannot create a temporary file for", path, errno);
    free(tmp);
    tmp = NULL;
    goto done;
  }
  if (write_all(fd, w.buf, w.len) != 0) {
    rc = fail_io("cannot write", tmp, errno);
    goto done;
  }
  if (fsync(fd) != 0) {
    rc = fail_io("cannot sync", tmp, errno);
    goto done;
  }
  rc = close(fd);
  fd = -1;
  if (rc != 0) {
    rc = fail_io("cannot close", tmp, errno);
    goto done;
  }

  /* The rename replaces the old checkpoint in one step. */
  if (rename(tmp, path) != 0) {
    rc = fail_io("cannot rename the temporary file over", path, errno);
    goto done;
  }
  free(tmp);
  tmp = NULL;
  rc = sync_parent(path);

done:
  if (fd >= 0)
    close(fd);
  if (tmp != NULL) {
    unlink(tmp);
    free(tmp);
  }
  free(w.buf);
  return rc;
}

/* ------------------------------------------------------------------ */
/* Loading. */

static int read_file(const char *path, unsigned char **buf, size_t *len)
{
  struct stat st;
  unsigned char *b;
  size_t n, got = 0;
  int fd = open(path, O_RDONLY);

  *buf = NULL;
  if (fd < 0)
    return fail_io("cannot open", path, errno);
  if (fstat(fd, &st) != 0) {
    int err = errno;

    close(fd);
    return fail_io("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return imp__fail(IMP_EIO, "checkpoint: %s is not a regular file", path);
  }

  n = (size_t)st.st_size;
  b = malloc(n > 0 ? n : 1);
  if (b == NULL) {
    close(fd);
    return imp__fail(IMP_ENOMEM, "checkpoint: %zu bytes for %s", n, path);
  }
  while (got < n) {
    ssize_t k = read(fd, b + got, n - got);

    if (k < 0 && errno == EINTR)
      continue;
    if (k <= 0) {
      int err = k < 0 ? errno : EIO;

      close(fd);
      free(b);
      return fail_io("cannot read", path, err);
    }
    got += (size_t)k;
  }
  close(fd);
  *buf = b;
  *len = n;
  return IMP_OK;
}

/* Everything a file holds, decoded but not yet applied. */
typedef struct ckpt_contents {
  uint32_t flags;
  double *params;
  uint64_t nparams;
  const char *optim_kind;
  size_t optim_kind_len;
  uint64_t optim_n, optim_t, nstate;
  double optim_lr;
  double *state;
  imp_progress progress;
} ckpt_contents;

/* The header: magic, version, length, checksum, in that order, so that
 * the message names the first thing wrong. */
static int check_envelope(const char *path, const unsigned char *b, size_t len)
{
  ckpt_reader r = {b, len, 8, 0};
  uint32_t version, stored, crc;
  uint64_t length;

  if (len < 12)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: truncated, %zu bytes "
                     "is less than a header",
                     path, len);
  if (memcmp(b, ckpt_magic, sizeof ckpt_magic) != 0)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: bad magic number, not "
                     "an imp checkpoint",
                     path);
  version = get_u32(&r);
  if (version != IMP_CHECKPOINT_VERSION)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: format version %u, this "
                     "library reads version %d",
                     path, (unsigned)version, IMP_CHECKPOINT_VERSION);
  if (len < CKPT_HEADER + CKPT_CRC)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: truncated, %zu bytes "
                     "is less than a header",
                     path, len);
  r.pos = 16;
  length = get_u64(&r);
  if (length != len)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: %s, the file has %zu "
                     "bytes, its header says %llu",
                     path, length > len ? "truncated" : "bad length", len,
                     (unsigned long long)length);
  r.pos = len - CKPT_CRC;
  stored = get_u32(&r);
  imp_crc32(b, len - CKPT_CRC, &crc);
  if (stored != crc)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: checksum mismatch "
                     "(stored %08x, computed %08x): the file is corrupted",
                     path, (unsigned)stored, (unsigned)crc);
  return IMP_OK;
}

/* Compare the file's layer records with the stack's, one by one. */
static int check_records(const char *path, ckpt_reader *r,
                         const imp_stack *stack)
{
  ckpt_records rs = {NULL, 0, 0};
  uint64_t count = get_u64(r);
  int rc = records_of_stack(stack, 0, &rs);

  if (rc == IMP_OK && count != rs.n)
    rc = imp__fail(IMP_EFORMAT,
                   "checkpoint %s: architecture mismatch, "
                   "%llu layers in the file, %zu in the stack",
                   path, (unsigned long long)count, rs.n);
  for (size_t i = 0; rc == IMP_OK && i < rs.n; i++) {
    const ckpt_record *want = &rs.r[i];
    ckpt_record got = {0, NULL, 0, NULL, 0, 0};

    got.depth = get_u32(r);
    got.kind = get_string(r, &got.kind_len);
    got.name = get_string(r, &got.name_len);
    got.nparams = get_u64(r);
    if (r->overrun)
      rc = imp__fail(IMP_EFORMAT,
                     "checkpoint %s: malformed layer record "
                     "%zu",
                     path, i);
    else if (got.depth != want->depth || got.kind_len != want->kind_len ||
             memcmp(got.kind, want->kind, got.kind_len) != 0 ||
             got.name_len != want->name_len ||
             memcmp(got.name, want->name, got.name_len) != 0 ||
             got.nparams != want->nparams)
      rc = imp__fail(IMP_EFORMAT,
                     "checkpoint %s: architecture mismatch "
                     "at layer record %zu: file has %.*s \"%.*s\" (depth "
                     "%u, %llu parameters), stack has %s \"%s\" (depth %u, "
                     "%llu parameters)",
                     path, i, (int)got.kind_len, got.kind, (int)got.name_len,
                     got.name, (unsigned)got.depth,
                     (unsigned long long)got.nparams, want->kind, want->name,
                     (unsigned)want->depth, (unsigned long long)want->nparams);
  }
  free(rs.r);
  return rc;
}

/* Decode the body after the envelope checks; allocations go into c. */
static int decode(const char *path, const unsigned char *b, size_t len,
                  const imp_stack *stack, const imp_optim *optim,
                  const imp_progress *progress, ckpt_contents *c)
{
  ckpt_reader r = {b, len - CKPT_CRC, 12, 0};
  int nomem = 0;

  c->flags = get_u32(&r);
  if ((c->flags & ~(uint32_t)(CKPT_HAS_OPTIM | CKPT_HAS_PROGRESS)) != 0)
    return imp__fail(IMP_EFORMAT, "checkpoint %s: unknown flags %#x", path,
                     (unsigned)c->flags);
  r.pos = 24;

  /* Architecture and parameters. */
  IMP__TRY(check_records(path, &r, stack));
  c->nparams = get_u64(&r);
  if (!r.overrun && c->nparams != imp_stack_nparams(stack))
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: %llu parameters, the "
                     "stack has %zu",
                     path, (unsigned long long)c->nparams,
                     imp_stack_nparams(stack));
  c->params = get_doubles(&r, c->nparams, &nomem);

  /* The optimizer section. */
  if (c->flags & CKPT_HAS_OPTIM) {
    c->optim_kind = get_string(&r, &c->optim_kind_len);
    c->optim_n = get_u64(&r);
    c->optim_t = get_u64(&r);
    c->optim_lr = get_f64(&r);
    c->nstate = get_u64(&r);
    c->state = nomem ? NULL : get_doubles(&r, c->nstate, &nomem);
  }
  if (c->flags & CKPT_HAS_PROGRESS) {
    c->progress.step = get_u64(&r);
    for (int i = 0; i < 4; i++)
      c->progress.rng.s[i] = get_u64(&r);
  }
  if (nomem)
    return imp__fail(IMP_ENOMEM, "checkpoint %s: decoding", path);
  if (r.overrun || r.pos != r.len)
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: malformed, %s at byte "
                     "%zu",
                     path, r.overrun ? "contents end early" : "trailing bytes",
                     r.pos);

  /* What the caller asked for must be there, and fit. */
  if (optim != NULL) {
    if (!(c->flags & CKPT_HAS_OPTIM))
      return imp__fail(IMP_EFORMAT,
                       "checkpoint %s: no optimizer state in "
                       "the file",
                       path);
    if (c->optim_kind_len != strlen(imp_optim_name(optim)) ||
        memcmp(c->optim_kind, imp_optim_name(optim), c->optim_kind_len) != 0 ||
        c->optim_n != imp_optim_size(optim) ||
        c->nstate != imp_optim_state_size(optim))
      return imp__fail(IMP_EFORMAT,
                       "checkpoint %s: optimizer mismatch, "
                       "file has %.*s for %llu parameters (%llu state), "
                       "given %s for %zu (%zu)",
                       path, (int)c->optim_kind_len, c->optim_kind,
                       (unsigned long long)c->optim_n,
                       (unsigned long long)c->nstate, imp_optim_name(optim),
                       imp_optim_size(optim), imp_optim_state_size(optim));
  }
  if (progress != NULL && !(c->flags & CKPT_HAS_PROGRESS))
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: no progress (step and "
                     "generator) in the file",
                     path);

  /* Every double must be finite, as save guarantees. */
  if (!imp__all_finite(c->params, (size_t)c->nparams) ||
      ((c->flags & CKPT_HAS_OPTIM) &&
       (!imp__all_finite(c->state, (size_t)c->nstate) ||
        !(c->optim_lr >= 0.0) || !isfinite(c->optim_lr))))
    return imp__fail(IMP_EFORMAT,
                     "checkpoint %s: NaN, Inf or a negative "
                     "learning rate in the contents",
                     path);
  return IMP_OK;
}

int imp_checkpoint_load(const char *path, imp_stack *stack, imp_optim *optim,
                        imp_progress *progress)
{
  ckpt_contents c;
  unsigned char *buf = NULL;
  size_t len = 0;
  int rc;

  if (path == NULL || stack == NULL)
    return imp__fail(IMP_EINVAL, "checkpoint_load: NULL argument");
  memset(&c, 0, sizeof c);

  /* Read and verify everything into temporaries. */
  IMP__TRY(read_file(path, &buf, &len));
  rc = check_envelope(path, buf, len);
  if (rc == IMP_OK)
    rc = decode(path, buf, len, stack, optim, progress, &c);

  /* Only now touch the caller's objects. */
  if (rc == IMP_OK) {
    if (c.nparams > 0)
      memcpy(imp_stack_params(stack), c.params,
             (size_t)c.nparams * sizeof(double));
    if (optim != NULL) {
      if (c.nstate > 0)
        memcpy(imp_optim_state(optim), c.state,
               (size_t)c.nstate * sizeof(double));
      imp_optim_set_steps(optim, c.optim_t);
      imp_optim_set_lr(optim, c.optim_lr);
    }
    if (progress != NULL)
      *progress = c.progress;
  }

  free(c.params);
  free(c.state);
  free(buf);
  return rc;
}
