/*
 * fuzz_maze.c - libFuzzer target for maze_parse, the maze demo's text
 * reader (examples/maze/maze.h).
 *
 * The input is the text.  A refusal is a normal outcome: it must leave
 * *mazes NULL and *count 0 and give a line and a message.  An accepted
 * text must give well-formed mazes (pixel kinds in range, exactly one S
 * and one G, a path only on open pixels and through S and G), and must
 * round-trip: written back with maze_write, blocks separated by blank
 * lines, and parsed again, it gives the same mazes and paths.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "maze.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* One maze as the reader promises it. */
static void check_maze(const maze *m)
{
  size_t n = m->h * m->w, starts = 0, goals = 0;

  FUZZ_CHECK(m->h >= 1 && m->w >= 1, "a maze has a pixel");
  FUZZ_CHECK(m->h <= MAZE_MAX_SIDE && m->w <= MAZE_MAX_SIDE, "maze size");
  FUZZ_CHECK(m->px != NULL, "a maze has pixels");
  for (size_t p = 0; p < n; p++) {
    FUZZ_CHECK(m->px[p] <= MAZE_GOAL, "pixel kind in range");
    starts += m->px[p] == MAZE_START;
    goals += m->px[p] == MAZE_GOAL;
    if (m->path != NULL) {
      FUZZ_CHECK(m->path[p] <= 1, "path entries are 0 or 1");
      FUZZ_CHECK(!m->path[p] || m->px[p] != MAZE_WALL, "path through a wall");
      FUZZ_CHECK(m->path[p] ||
                     (m->px[p] != MAZE_START && m->px[p] != MAZE_GOAL),
                 "a path holds S and G");
    }
  }
  FUZZ_CHECK(starts == 1 && goals == 1, "exactly one S and one G");
}

static int same_maze(const maze *a, const maze *b)
{
  size_t n = a->h * a->w;

  if (a->h != b->h || a->w != b->w || memcmp(a->px, b->px, n) != 0)
    return 0;
  if ((a->path == NULL) != (b->path == NULL))
    return 0;
  return a->path == NULL || memcmp(a->path, b->path, n) == 0;
}

/* Write the mazes back as text, parse that, and compare. */
static void check_round_trip(const maze *mazes, size_t count)
{
  char *text = NULL;
  size_t len = 0, count2 = 0;
  maze *again = NULL;
  maze_error err;
  FILE *f = open_memstream(&text, &len);

  FUZZ_CHECK(f != NULL, "open_memstream");
  for (size_t i = 0; i < count; i++) {
    if (i > 0)
      FUZZ_CHECK(fputc('\n', f) != EOF, "blank line");
    FUZZ_CHECK(maze_write(f, &mazes[i], mazes[i].path) == 0, "maze_write");
  }
  FUZZ_CHECK(fclose(f) == 0, "fclose");

  FUZZ_CHECK(maze_parse(text, len, &again, &count2, &err) == 0,
             "a written maze parses again");
  FUZZ_CHECK(count2 == count, "the same number of mazes");
  for (size_t i = 0; i < count; i++)
    FUZZ_CHECK(same_maze(&mazes[i], &again[i]), "the same maze and path");
  maze_free_all(again, count2);
  free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  maze *mazes = NULL;
  size_t count = 0;
  maze_error err;
  int rc = maze_parse((const char *)data, size, &mazes, &count, &err);

  if (rc != 0) {
    FUZZ_CHECK(rc < 0, "failure is negative");
    FUZZ_CHECK(mazes == NULL && count == 0, "a refusal returns no mazes");
    FUZZ_CHECK(err.line >= 1, "a refusal names a line");
    FUZZ_CHECK(memchr(err.message, '\0', sizeof err.message) != NULL &&
                   err.message[0] != '\0',
               "a refusal says why");
    return 0;
  }

  FUZZ_CHECK(mazes != NULL && count >= 1, "success gives a maze");
  for (size_t i = 0; i < count; i++)
    check_maze(&mazes[i]);
  check_round_trip(mazes, count);
  maze_free_all(mazes, count);
  return 0;
}
