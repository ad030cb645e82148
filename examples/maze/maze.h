/*
 * maze.h - perfect mazes for the maze demo: generator, encoding and the
 * plain-text format.
 *
 * A maze of k x k cells is drawn by randomized depth-first backtracking
 * (the "recursive backtracker"): start from a random cell, step to a random
 * unvisited neighbour knocking down the wall between, and back up when none
 * is left.  Every cell is then reachable by exactly one path (a spanning
 * tree), so the path between the start and the goal, two distinct random
 * cells, is unique.  Its grid of cells and walls has side 2k - 1 (the size
 * name used in the literature: "9x9" has 5 x 5 cells); with a one-unit wall
 * border the picture has (2k + 1) x (2k + 1) pixels, pixel (2i + 1, 2j + 1)
 * being cell (i, j).
 *
 * Text format: one maze per block of rows, blocks separated by blank lines;
 * rows of equal length; '#' wall, '.' open, 'S' start, 'G' goal, and '*' an
 * open pixel on the path (what the solver writes).  Exactly one S and one G
 * per maze.  The reader works on a memory buffer and reports the first
 * problem with its line number.
 *
 * Ownership: maze_generate and maze_parse fill mazes the caller frees with
 * maze_free (or maze_free_all for an array).  Functions return 0 on success
 * and a negative value (-1) on failure, with a message.
 */
#ifndef IMP_MAZE_H
#define IMP_MAZE_H

#include <stddef.h>
#include <stdio.h>

#include "imp/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Pixel kinds. */
enum { MAZE_WALL = 0, MAZE_OPEN = 1, MAZE_START = 2, MAZE_GOAL = 3 };

/** The largest side the reader and generator accept, in pixels. */
#define MAZE_MAX_SIDE 4097

/** A maze picture: h x w pixels, row-major. */
typedef struct maze {
  size_t h, w;
  unsigned char *px;   /**< h w pixel kinds */
  unsigned char *path; /**< h w: 1 on the path, S and G included; NULL if
                            the maze came without one */
} maze;

/** Where and why parsing failed. */
typedef struct maze_error {
  size_t line; /**< 1-based line of the problem (0: none) */
  char message[160];
} maze_error;

/** Free the maze's buffers and zero it; NULL is accepted. */
void maze_free(maze *m);

/** Free count mazes and the array itself; NULL is accepted. */
void maze_free_all(maze *mazes, size_t count);

/**
 * A perfect maze of cells x cells cells (cells >= 2, 2 cells + 1 <=
 * MAZE_MAX_SIDE) drawn from rng, with start, goal and path set.
 */
int maze_generate(size_t cells, imp_rng *rng, maze *m);

/** The number of cells per side for a size name 2k - 1 (odd, >= 3), or 0
 *  if the name is not of that form. */
size_t maze_cells_for_size(size_t size);

/**
 * Compute m->path (allocated if NULL) as the shortest path from S to G
 * through open pixels (4-neighbour moves), the unique one in a perfect
 * maze.  Returns -1 if G cannot be reached from S.
 */
int maze_solve_bfs(maze *m);

/**
 * Parse every maze of text[0..len).  On success *mazes (free with
 * maze_free_all) holds *count >= 1 mazes; a maze with '*' pixels gets a
 * path (its '*', S and G), one without gets path NULL.  On failure
 * *mazes is NULL and err (may be NULL) says why: empty input, ragged rows,
 * an unknown character, no start or goal, a second start or goal, or a
 * maze too large.
 */
int maze_parse(const char *text, size_t len, maze **mazes, size_t *count,
               maze_error *err);

/** Read all of f into a NUL-terminated buffer the caller frees. */
int maze_read_all(FILE *f, char **text, size_t *len);

/**
 * Write m in the text format, with '*' on every pixel where path (h w
 * entries, may be NULL: none) is set other than S and G, and a newline
 * after the last row.
 */
int maze_write(FILE *f, const maze *m, const unsigned char *path);

/**
 * The network's input for m: x (3 h w doubles) gets the channels open
 * (S and G included), start and goal, each 0 or 1.
 */
void maze_encode(const maze *m, double *x);

#ifdef __cplusplus
}
#endif

#endif /* IMP_MAZE_H */
