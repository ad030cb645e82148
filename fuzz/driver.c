/*
 * driver.c - a plain main for the fuzz targets, without libFuzzer: it
 * calls LLVMFuzzerTestOneInput once on every file named on the command
 * line, and on every file in a directory named there (not recursing, and
 * skipping names that start with a dot).  Meson's tests use it to replay
 * the corpus and the regression inputs under the normal and sanitizer
 * builds.  It exits 0 when every input ran, 1 if a file could not be
 * read; a broken check inside the target aborts.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Read all of path into a new buffer (one byte more, so that an empty
 * file still gives a pointer); 0 on success. */
static int read_input(const char *path, uint8_t **data, size_t *size)
{
  FILE *f = fopen(path, "rb");
  uint8_t *buf = NULL;
  size_t cap = 0, n = 0;

  if (f == NULL)
    return -1;
  for (;;) {
    if (n == cap) {
      size_t grown = cap ? 2 * cap : 4096;
      uint8_t *b2 = realloc(buf, grown + 1);

      if (b2 == NULL)
        break;
      buf = b2;
      cap = grown;
    }
    size_t got = fread(buf + n, 1, cap - n, f);

    n += got;
    if (got == 0)
      break;
  }
  if (buf == NULL || ferror(f) || !feof(f)) {
    fclose(f);
    free(buf);
    return -1;
  }
  fclose(f);
  *data = buf;
  *size = n;
  return 0;
}

static int run_file(const char *path, size_t *runs)
{
  uint8_t *data;
  size_t size;

  if (read_input(path, &data, &size) != 0) {
    fprintf(stderr, "cannot read %s\n", path);
    return -1;
  }
  LLVMFuzzerTestOneInput(data, size);
  free(data);
  ++*runs;
  return 0;
}

/* Every plain file directly inside dir, in the order readdir gives. */
static int run_directory(const char *dir, size_t *runs)
{
  DIR *d = opendir(dir);
  struct dirent *e;
  int rc = 0;

  if (d == NULL) {
    fprintf(stderr, "cannot open directory %s\n", dir);
    return -1;
  }
  while ((e = readdir(d)) != NULL) {
    size_t need = strlen(dir) + strlen(e->d_name) + 2;
    char *path;
    struct stat st;

    if (e->d_name[0] == '.')
      continue;
    path = malloc(need);
    if (path == NULL) {
      rc = -1;
      break;
    }
    snprintf(path, need, "%s/%s", dir, e->d_name);
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode) &&
        run_file(path, runs) != 0)
      rc = -1;
    free(path);
  }
  closedir(d);
  return rc;
}

int main(int argc, char **argv)
{
  size_t runs = 0;
  int failed = 0;

  for (int i = 1; i < argc; i++) {
    struct stat st;

    if (stat(argv[i], &st) != 0) {
      fprintf(stderr, "no such file or directory: %s\n", argv[i]);
      failed = 1;
    } else if (S_ISDIR(st.st_mode)) {
      failed |= run_directory(argv[i], &runs) != 0;
    } else {
      failed |= run_file(argv[i], &runs) != 0;
    }
  }
  printf("%zu inputs ran\n", runs);
  return failed;
}
