/*
 * seed_checkpoint.c - writes the checkpoint fuzz target's seed corpus from
 * the fixture (fixture.h), with imp_checkpoint_save itself.
 *
 *   seed_checkpoint DIR          write the seeds into DIR
 *   seed_checkpoint --check DIR  save the valid seeds again, to a
 *                                temporary directory, and compare them
 *                                byte for byte with those in DIR (exit 1
 *                                if they differ: the format or the
 *                                fixture changed and the corpus is stale)
 *
 * The valid seeds are the three section sets the loader reads: parameters
 * only, parameters and optimizer, and all three.  The broken ones are
 * derived from the full file: cut short at several points, a flipped byte
 * in a parameter (checksum mismatch), a wrong version, a wrong magic
 * number, and an empty file.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fixture.h"
#include "imp/status.h"

/* The valid seeds: name, with optimizer, with progress. */
static const struct {
  const char *name;
  int optim, progress;
} valid[] = {
    {"valid_params.ckpt", 0, 0},
    {"valid_optim.ckpt", 1, 0},
    {"valid_full.ckpt", 1, 1},
};

static int read_whole(const char *path, unsigned char **buf, size_t *len)
{
  FILE *f = fopen(path, "rb");
  long n;

  if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 ||
      fseek(f, 0, SEEK_SET) != 0) {
    if (f != NULL)
      fclose(f);
    return -1;
  }
  *buf = malloc((size_t)n + 1);
  *len = (size_t)n;
  if (*buf == NULL || fread(*buf, 1, *len, f) != *len) {
    free(*buf);
    fclose(f);
    return -1;
  }
  fclose(f);
  return 0;
}

static int write_whole(const char *path, const unsigned char *buf, size_t len)
{
  FILE *f = fopen(path, "wb");
  int rc = 0;

  if (f == NULL)
    return -1;
  if (len > 0 && fwrite(buf, 1, len, f) != len)
    rc = -1;
  if (fclose(f) != 0)
    rc = -1;
  return rc;
}

static int save_valid(const char *dir, fuzz_fixture *f)
{
  char path[4096];

  for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++) {
    snprintf(path, sizeof path, "%s/%s", dir, valid[i].name);
    if (imp_checkpoint_save(path, f->stack, valid[i].optim ? f->optim : NULL,
                            valid[i].progress ? &f->progress : NULL) !=
        IMP_OK) {
      fprintf(stderr, "saving %s: %s\n", path, imp_last_error());
      return -1;
    }
  }
  return 0;
}

/* The broken variants of dir/valid_full.ckpt. */
static int write_broken(const char *dir)
{
  char path[4096];
  unsigned char *full, *copy;
  size_t len;
  static const size_t cuts[] = {0, 11, 31, 60, 200};
  int rc = 0;

  snprintf(path, sizeof path, "%s/valid_full.ckpt", dir);
  if (read_whole(path, &full, &len) != 0 || len < 300)
    return -1;
  copy = malloc(len);
  if (copy == NULL) {
    free(full);
    return -1;
  }

  /* Cut short: the header, the records, the parameters, the end. */
  for (size_t i = 0; rc == 0 && i < sizeof cuts / sizeof cuts[0]; i++) {
    snprintf(path, sizeof path, "%s/truncated_%zu.ckpt", dir, cuts[i]);
    rc = write_whole(path, full, cuts[i]);
  }
  snprintf(path, sizeof path, "%s/truncated_last_byte.ckpt", dir);
  rc = rc ? rc : write_whole(path, full, len - 1);

  /* One byte changed: inside the parameters, the version, the magic. */
  memcpy(copy, full, len);
  copy[100] ^= 0x40;
  snprintf(path, sizeof path, "%s/corrupt_param.ckpt", dir);
  rc = rc ? rc : write_whole(path, copy, len);
  memcpy(copy, full, len);
  copy[8] = 2;
  snprintf(path, sizeof path, "%s/wrong_version.ckpt", dir);
  rc = rc ? rc : write_whole(path, copy, len);
  memcpy(copy, full, len);
  copy[1] = 'X';
  snprintf(path, sizeof path, "%s/wrong_magic.ckpt", dir);
  rc = rc ? rc : write_whole(path, copy, len);

  free(copy);
  free(full);
  return rc;
}

/* Save the valid seeds to a temporary directory and compare. */
static int check_seeds(const char *dir, fuzz_fixture *f)
{
  char tmp[] = "/tmp/imp-seed-check-XXXXXX", a[4096], b[4096];
  int rc = 0;

  if (mkdtemp(tmp) == NULL || save_valid(tmp, f) != 0)
    return -1;
  for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++) {
    unsigned char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;

    snprintf(a, sizeof a, "%s/%s", tmp, valid[i].name);
    snprintf(b, sizeof b, "%s/%s", dir, valid[i].name);
    if (read_whole(a, &x, &nx) != 0 || read_whole(b, &y, &ny) != 0 ||
        nx != ny || memcmp(x, y, nx) != 0) {
      fprintf(stderr, "%s differs from a fresh save: regenerate the seeds\n",
              b);
      rc = -1;
    }
    free(x);
    free(y);
    unlink(a);
  }
  rmdir(tmp);
  return rc;
}

int main(int argc, char **argv)
{
  fuzz_fixture f;
  int check = argc == 3 && strcmp(argv[1], "--check") == 0;
  int rc;

  if (argc != 2 && !check) {
    fprintf(stderr, "usage: %s [--check] DIR\n", argv[0]);
    return 2;
  }
  fuzz_fixture_make(&f);
  if (check)
    rc = check_seeds(argv[2], &f);
  else
    rc = save_valid(argv[1], &f) == 0 ? write_broken(argv[1]) : -1;
  fuzz_fixture_free(&f);
  if (rc == 0)
    printf("%s\n", check ? "seeds up to date" : "seeds written");
  return rc == 0 ? 0 : 1;
}
