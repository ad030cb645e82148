/*
 * maze.c - the generator (randomized depth-first backtracking), the
 * breadth-first path, the text reader and writer, and the encoding.
 */
#include "maze.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void maze_free(maze *m)
{
  if (m == NULL)
    return;
  free(m->px);
  free(m->path);
  memset(m, 0, sizeof *m);
}

void maze_free_all(maze *mazes, size_t count)
{
  if (mazes == NULL)
    return;
  for (size_t i = 0; i < count; i++)
    maze_free(&mazes[i]);
  free(mazes);
}

size_t maze_cells_for_size(size_t size)
{
  if (size < 3 || size % 2 == 0)
    return 0;
  return (size + 1) / 2;
}

int maze_generate(size_t cells, imp_rng *rng, maze *m)
{
  static const int di[4] = {-1, 1, 0, 0}, dj[4] = {0, 0, -1, 1};
  size_t side = 2 * cells + 1, ncell = cells * cells, top = 0;
  size_t *stack;
  unsigned char *visited;

  if (m == NULL || rng == NULL || cells < 2 || side > MAZE_MAX_SIDE)
    return -1;
  memset(m, 0, sizeof *m);
  m->h = m->w = side;
  m->px = calloc(side * side, 1);
  stack = malloc(ncell * sizeof *stack);
  visited = calloc(ncell, 1);
  if (m->px == NULL || stack == NULL || visited == NULL) {
    free(stack);
    free(visited);
    maze_free(m);
    return -1;
  }

  /* Depth-first backtracking from a random cell: carve to a random
   * unvisited neighbour, or back up when there is none. */
  stack[top++] = (size_t)imp_rng_below(rng, ncell);
  visited[stack[0]] = 1;
  m->px[(2 * (stack[0] / cells) + 1) * side + 2 * (stack[0] % cells) + 1] =
      MAZE_OPEN;
  while (top > 0) {
    size_t c = stack[top - 1], ci = c / cells, cj = c % cells;
    size_t next[4], nnext = 0;

    for (int k = 0; k < 4; k++) {
      long ni = (long)ci + di[k], nj = (long)cj + dj[k];
      if (ni < 0 || nj < 0 || ni >= (long)cells || nj >= (long)cells)
        continue;
      if (!visited[(size_t)ni * cells + (size_t)nj])
        next[nnext++] = (size_t)k;
    }
    if (nnext == 0) {
      top--;
      continue;
    }
    size_t k = next[imp_rng_below(rng, nnext)];
    size_t ni = (size_t)((long)ci + di[k]), nj = (size_t)((long)cj + dj[k]);
    size_t n = ni * cells + nj;
    visited[n] = 1;
    m->px[(ci + ni + 1) * side + (cj + nj + 1)] = MAZE_OPEN;
    m->px[(2 * ni + 1) * side + 2 * nj + 1] = MAZE_OPEN;
    stack[top++] = n;
  }
  free(stack);
  free(visited);

  /* Start and goal: two distinct random cells. */
  size_t s = (size_t)imp_rng_below(rng, ncell);
  size_t g = (size_t)imp_rng_below(rng, ncell - 1);
  if (g >= s)
    g++;
  m->px[(2 * (s / cells) + 1) * side + 2 * (s % cells) + 1] = MAZE_START;
  m->px[(2 * (g / cells) + 1) * side + 2 * (g % cells) + 1] = MAZE_GOAL;
  if (maze_solve_bfs(m) != 0) {
    maze_free(m);
    return -1;
  }
  return 0;
}

int maze_solve_bfs(maze *m)
{
  size_t n, s = SIZE_MAX, g = SIZE_MAX, head = 0, tail = 0;
  size_t *queue, *parent;

  if (m == NULL || m->px == NULL || m->h == 0 || m->w == 0)
    return -1;
  n = m->h * m->w;
  for (size_t i = 0; i < n; i++) {
    if (m->px[i] == MAZE_START)
      s = i;
    else if (m->px[i] == MAZE_GOAL)
      g = i;
  }
  if (s == SIZE_MAX || g == SIZE_MAX)
    return -1;
  if (m->path == NULL)
    m->path = malloc(n);
  queue = malloc(n * sizeof *queue);
  parent = malloc(n * sizeof *parent);
  if (m->path == NULL || queue == NULL || parent == NULL) {
    free(queue);
    free(parent);
    return -1;
  }

  /* Breadth-first search from S over open pixels. */
  for (size_t i = 0; i < n; i++)
    parent[i] = SIZE_MAX;
  parent[s] = s;
  queue[tail++] = s;
  while (head < tail && parent[g] == SIZE_MAX) {
    size_t p = queue[head++], i = p / m->w, j = p % m->w;
    size_t nb[4], nn = 0;
    if (i > 0)
      nb[nn++] = p - m->w;
    if (i + 1 < m->h)
      nb[nn++] = p + m->w;
    if (j > 0)
      nb[nn++] = p - 1;
    if (j + 1 < m->w)
      nb[nn++] = p + 1;
    for (size_t k = 0; k < nn; k++) {
      if (m->px[nb[k]] != MAZE_WALL && parent[nb[k]] == SIZE_MAX) {
        parent[nb[k]] = p;
        queue[tail++] = nb[k];
      }
    }
  }

  /* Walk back from G to S. */
  memset(m->path, 0, n);
  int rc = parent[g] == SIZE_MAX ? -1 : 0;
  for (size_t p = g; rc == 0; p = parent[p]) {
    m->path[p] = 1;
    if (p == s)
      break;
  }
  free(queue);
  free(parent);
  return rc;
}

static int fail(maze_error *err, size_t line, const char *what)
{
  if (err != NULL) {
    err->line = line;
    snprintf(err->message, sizeof err->message, "line %zu: %s", line, what);
  }
  return -1;
}

/* A line is blank if it holds only spaces, tabs and a carriage return. */
static int blank_line(const char *s, size_t len)
{
  for (size_t i = 0; i < len; i++)
    if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
      return 0;
  return 1;
}

/* Parse the rows [first, first + rows) of one block into m. */
static int parse_block(const char *const *row, const size_t *rowlen,
                       const size_t *lineno, size_t rows, maze *m,
                       maze_error *err)
{
  size_t w = rowlen[0], sline = 0, gline = 0, stars = 0;
  char what[120];

  if (rows > MAZE_MAX_SIDE || w > MAZE_MAX_SIDE) {
    snprintf(what, sizeof what, "maze larger than %d pixels a side",
             MAZE_MAX_SIDE);
    return fail(err, lineno[0], what);
  }
  memset(m, 0, sizeof *m);
  m->h = rows;
  m->w = w;
  m->px = malloc(rows * w);
  m->path = calloc(rows * w, 1);
  if (m->px == NULL || m->path == NULL) {
    maze_free(m);
    return fail(err, lineno[0], "out of memory");
  }

  for (size_t i = 0; i < rows; i++) {
    if (rowlen[i] != w) {
      snprintf(what, sizeof what,
               "ragged rows: this row has %zu characters, the maze's first "
               "row (line %zu) has %zu",
               rowlen[i], lineno[0], w);
      maze_free(m);
      return fail(err, lineno[i], what);
    }
    for (size_t j = 0; j < w; j++) {
      unsigned char c = (unsigned char)row[i][j], k;
      switch (c) {
      case '#':
        k = MAZE_WALL;
        break;
      case '.':
        k = MAZE_OPEN;
        break;
      case '*':
        k = MAZE_OPEN;
        m->path[i * w + j] = 1;
        stars++;
        break;
      case 'S':
      case 'G':
        if ((c == 'S' ? sline : gline) != 0) {
          snprintf(what, sizeof what,
                   "a second %s '%c' (the first is on line "
                   "%zu)",
                   c == 'S' ? "start" : "goal", c, c == 'S' ? sline : gline);
          maze_free(m);
          return fail(err, lineno[i], what);
        }
        if (c == 'S')
          sline = lineno[i];
        else
          gline = lineno[i];
        k = c == 'S' ? MAZE_START : MAZE_GOAL;
        m->path[i * w + j] = 1;
        break;
      default:
        if (c >= 0x20 && c < 0x7f)
          snprintf(what, sizeof what,
                   "column %zu: unknown character '%c' "
                   "(expected '#', '.', 'S', 'G' or '*')",
                   j + 1, c);
        else
          snprintf(what, sizeof what,
                   "column %zu: unknown character 0x%02x "
                   "(expected '#', '.', 'S', 'G' or '*')",
                   j + 1, c);
        maze_free(m);
        return fail(err, lineno[i], what);
      }
      m->px[i * w + j] = k;
    }
  }

  if (sline == 0 || gline == 0) {
    snprintf(what, sizeof what, "the maze on lines %zu-%zu has no %s",
             lineno[0], lineno[rows - 1],
             sline == 0 ? "start 'S'" : "goal 'G'");
    maze_free(m);
    return fail(err, lineno[0], what);
  }
  if (stars == 0) {
    free(m->path);
    m->path = NULL;
  }
  return 0;
}

int maze_parse(const char *text, size_t len, maze **mazes, size_t *count,
               maze_error *err)
{
  const char **row = NULL;
  size_t *rowlen = NULL, *lineno = NULL, nrows = 0, cap = 0, line = 0;
  maze *out = NULL;
  size_t nout = 0, outcap = 0;
  size_t pos = 0;
  int rc = 0;

  if (err != NULL) {
    err->line = 0;
    err->message[0] = '\0';
  }
  if (mazes == NULL || count == NULL || (text == NULL && len > 0))
    return fail(err, 0, "invalid arguments");
  *mazes = NULL;
  *count = 0;

  /* Split into lines; a run of non-blank lines is one maze. */
  while (rc == 0 && pos <= len) {
    const char *s = text + pos;
    const char *nl = pos < len ? memchr(s, '\n', len - pos) : NULL;
    size_t l = nl != NULL ? (size_t)(nl - s) : len - pos;
    int last = nl == NULL;

    if (pos == len && pos > 0 && nrows == 0)
      break; /* nothing after the last newline */
    line++;
    if (!blank_line(s, l)) {
      size_t trimmed = l;
      if (trimmed > 0 && s[trimmed - 1] == '\r')
        trimmed--;
      if (nrows == cap) {
        size_t nc = cap ? 2 * cap : 64;
        const char **r2 = realloc(row, nc * sizeof *r2);
        size_t *l2, *n2;
        if (r2 != NULL)
          row = r2;
        l2 = r2 ? realloc(rowlen, nc * sizeof *l2) : NULL;
        if (l2 != NULL)
          rowlen = l2;
        n2 = l2 ? realloc(lineno, nc * sizeof *n2) : NULL;
        if (n2 == NULL) {
          rc = fail(err, line, "out of memory");
          break;
        }
        lineno = n2;
        cap = nc;
      }
      row[nrows] = s;
      rowlen[nrows] = trimmed;
      lineno[nrows++] = line;
    }
    if (nrows > 0 && (blank_line(s, l) || last)) {
      if (nout == outcap) {
        size_t nc = outcap ? 2 * outcap : 8;
        maze *o2 = realloc(out, nc * sizeof *o2);
        if (o2 == NULL) {
          rc = fail(err, line, "out of memory");
          break;
        }
        out = o2;
        outcap = nc;
      }
      rc = parse_block(row, rowlen, lineno, nrows, &out[nout], err);
      if (rc == 0)
        nout++;
      nrows = 0;
    }
    if (last)
      break;
    pos += l + 1;
  }
  free(row);
  free(rowlen);
  free(lineno);

  if (rc == 0 && nout == 0)
    rc = fail(err, line == 0 ? 1 : line, "empty input: no maze found");
  if (rc != 0) {
    maze_free_all(out, nout);
    return -1;
  }
  *mazes = out;
  *count = nout;
  return 0;
}

int maze_read_all(FILE *f, char **text, size_t *len)
{
  size_t cap = 1 << 16, n = 0;
  char *buf = malloc(cap);

  if (buf == NULL)
    return -1;
  for (;;) {
    if (n + 1 >= cap) {
      char *b2 = realloc(buf, 2 * cap);
      if (b2 == NULL) {
        free(buf);
        return -1;
      }
      buf = b2;
      cap *= 2;
    }
    size_t got = fread(buf + n, 1, cap - n - 1, f);
    n += got;
    if (got == 0)
      break;
  }
  if (ferror(f)) {
    free(buf);
    return -1;
  }
  buf[n] = '\0';
  *text = buf;
  *len = n;
  return 0;
}

int maze_write(FILE *f, const maze *m, const unsigned char *path)
{
  static const char glyph[4] = {'#', '.', 'S', 'G'};

  if (f == NULL || m == NULL || m->px == NULL)
    return -1;
  for (size_t i = 0; i < m->h; i++) {
    for (size_t j = 0; j < m->w; j++) {
      size_t p = i * m->w + j;
      char c = glyph[m->px[p] & 3];
      if (path != NULL && path[p] && m->px[p] == MAZE_OPEN)
        c = '*';
      if (fputc(c, f) == EOF)
        return -1;
    }
    if (fputc('\n', f) == EOF)
      return -1;
  }
  return 0;
}

void maze_encode(const maze *m, double *x)
{
  size_t n = m->h * m->w;

  for (size_t p = 0; p < n; p++) {
    x[p] = m->px[p] != MAZE_WALL;
    x[n + p] = m->px[p] == MAZE_START;
    x[2 * n + p] = m->px[p] == MAZE_GOAL;
  }
}
