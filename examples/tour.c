/*
 * examples/tour.c - a tour of imp: every kind's demo in turn, then the
 * maze DEQ's inference.
 *
 * The tour runs the demo binaries that sit next to it in the build tree,
 * each with its embedded defaults:
 *
 *     root    imp-root-demo    a root-finding layer on the circle
 *     deq     imp-deq-demo     a deep equilibrium layer and its solvers
 *     ode     imp-ode-demo     a neural ODE trained through CVODES' adjoint
 *     qp      imp-opt-demo     OptNet's QP layer learning 4x4 Sudoku
 *     stack   imp-stack-demo   dense, DEQ, ODE, root and QP in one model
 *     maze    maze/imp-maze    mazes of several sizes solved by the
 *                              shipped checkpoint, each path compared with
 *                              the generator's own solution
 *
 * Each demo checks itself and exits non-zero if a check fails.  The tour
 * keeps every demo's output (and its figure) in a work directory, prints
 * one summary line per part (name, status, wall time, one key figure
 * taken from the demo's results) and exits non-zero if any part failed.
 *
 * Usage: imp-tour [--dir DIR] [--quick]
 *   --dir DIR   where the logs and figures go (default: a new directory
 *               under $TMPDIR or /tmp)
 *   --quick     shorter training for the two slowest demos (imp-ode-demo
 *               --iters 300, imp-opt-demo --epochs 10)
 * The defaults take about 65 s of wall time on this project's 2-core
 * machine, well inside the 3 minutes the tour is meant for.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ARGS 8
#define PATH_LEN 4096
#define MAZE_COUNT 10 /* mazes per size */

static const int maze_sizes[] = {9, 17, 33, 59};

/* One part of the tour. */
typedef struct part {
  const char *name;
  const char *binary; /* relative to the tour's own directory */
  const char *args[MAX_ARGS];
  const char *key; /* the stdout line starting with this is the figure */
} part;

static double now(void)
{
  struct timespec t;

  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/*
 * Run argv[0] with stdout to out_path and stderr to err_path (either may
 * be NULL: inherited), in directory cwd; return its exit status, or -1 if
 * it could not be started or was killed.
 */
static int run(char *const argv[], const char *out_path, const char *err_path,
               const char *cwd)
{
  pid_t pid = fork();
  int status;

  if (pid < 0)
    return -1;
  if (pid == 0) {
    int out = out_path == NULL
                  ? -1
                  : open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err = err_path == NULL
                  ? -1
                  : open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    if ((out_path != NULL && out < 0) || (err_path != NULL && err < 0))
      _exit(127);
    if (out >= 0)
      dup2(out, STDOUT_FILENO);
    if (err >= 0)
      dup2(err, STDERR_FILENO);
    if (cwd != NULL && chdir(cwd) != 0)
      _exit(127);
    execv(argv[0], argv);
    fprintf(stderr, "imp-tour: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR)
      return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* dst = a followed by b; 0 if it fits, -1 if it does not. */
static int join(char *dst, size_t len, const char *a, const char *b)
{
  int n = snprintf(dst, len, "%s%s", a, b);

  return n < 0 || (size_t)n >= len ? -1 : 0;
}

/* dst = dir/name followed by ext; 0 if it fits, -1 if it does not. */
static int file_path(char *dst, size_t len, const char *dir, const char *name,
                     const char *ext)
{
  int n = snprintf(dst, len, "%s/%s%s", dir, name, ext);

  return n < 0 || (size_t)n >= len ? -1 : 0;
}

/* The first line of the file that starts with key, without its newline,
 * into line (size len); "" if there is none. */
static void find_line(const char *path, const char *key, char *line, size_t len)
{
  FILE *f = fopen(path, "r");
  char buf[512];

  line[0] = '\0';
  if (f == NULL)
    return;
  while (fgets(buf, sizeof buf, f) != NULL)
    if (strncmp(buf, key, strlen(key)) == 0) {
      buf[strcspn(buf, "\n")] = '\0';
      if (join(line, len, buf + strspn(buf, " "), "") != 0)
        line[len - 1] = '\0';
      break;
    }
  fclose(f);
}

/* Read a whole file into a new string (the caller frees it), or NULL. */
static char *slurp(const char *path)
{
  FILE *f = fopen(path, "rb");
  char *text = NULL;
  long size;

  if (f == NULL)
    return NULL;
  if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 &&
      fseek(f, 0, SEEK_SET) == 0 && (text = malloc((size_t)size + 1)) != NULL) {
    if (fread(text, 1, (size_t)size, f) != (size_t)size) {
      free(text);
      text = NULL;
    } else {
      text[size] = '\0';
    }
  }
  fclose(f);
  return text;
}

/*
 * Count the mazes (blocks separated by blank lines) on which the solved
 * text equals the generator's solution; *total receives the number of
 * mazes in the solution.
 */
static int count_exact(const char *solved, const char *truth, int *total)
{
  int exact = 0;

  *total = 0;
  while (*truth != '\0') {
    const char *end = strstr(truth, "\n\n");
    size_t n = end == NULL ? strlen(truth) : (size_t)(end - truth) + 2;

    (*total)++;
    if (strlen(solved) >= n && strncmp(solved, truth, n) == 0)
      exact++;
    truth += n;
    solved += strlen(solved) >= n ? n : strlen(solved);
  }
  return exact;
}

/*
 * The maze part: for each size, generate MAZE_COUNT mazes, solve them
 * with the shipped checkpoint and compare with --solution.  Writes the
 * figure into key.  Returns 0 if every path is exact.
 */
static int maze_part(const char *self, const char *dir, char *key, size_t len)
{
  char bin[PATH_LEN], maze[PATH_LEN], truth[PATH_LEN], solved[PATH_LEN];
  char err[PATH_LEN], base[PATH_LEN], size[16], count[16], seed[] = "7";
  char name[32];
  char generate[] = "generate", solve[] = "solve", size_opt[] = "--size";
  char count_opt[] = "--count", seed_opt[] = "--seed";
  char solution_opt[] = "--solution";
  int exact = 0, total = 0, failed = 0, pos = 0;

  key[0] = '\0';
  if (join(bin, sizeof bin, self, "/maze/imp-maze") != 0 ||
      join(err, sizeof err, dir, "/maze.err") != 0)
    return 1;
  snprintf(count, sizeof count, "%d", MAZE_COUNT);
  for (size_t s = 0; s < sizeof maze_sizes / sizeof maze_sizes[0]; s++) {
    char *gen[] = {bin,   generate, size_opt, size, count_opt,
                   count, seed_opt, seed,     NULL, NULL};
    char *sol[] = {bin, solve, maze, NULL};
    char *a, *b;
    int ok = 0, n = 0;

    snprintf(size, sizeof size, "%d", maze_sizes[s]);
    snprintf(name, sizeof name, "/maze%d", maze_sizes[s]);
    if (join(base, sizeof base, dir, name) != 0 ||
        join(maze, sizeof maze, base, ".txt") != 0 ||
        join(truth, sizeof truth, base, ".solution") != 0 ||
        join(solved, sizeof solved, base, ".solved") != 0)
      return 1;
    if (run(gen, maze, err, NULL) != 0)
      return 1;
    gen[8] = solution_opt;
    if (run(gen, truth, err, NULL) != 0 || run(sol, solved, err, NULL) != 0)
      return 1;
    a = slurp(solved);
    b = slurp(truth);
    if (a != NULL && b != NULL)
      ok = count_exact(a, b, &n);
    free(a);
    free(b);
    if (n == 0 || ok != n)
      failed = 1;
    exact += ok;
    total += n;
    pos += snprintf(key + pos, len - (size_t)pos, "%s%dx%d %d/%d",
                    s == 0 ? "" : ", ", maze_sizes[s], maze_sizes[s], ok, n);
    if ((size_t)pos >= len)
      break;
  }
  if ((size_t)pos < len)
    snprintf(key + pos, len - (size_t)pos, " exact paths");
  return failed || exact != total;
}

/* The directory of the running binary, from /proc or from argv[0]. */
static int self_dir(const char *argv0, char *dir, size_t len)
{
  ssize_t n = readlink("/proc/self/exe", dir, len - 1);
  char *slash;

  if (n > 0) {
    dir[n] = '\0';
  } else {
    snprintf(dir, len, "%s", argv0);
  }
  slash = strrchr(dir, '/');
  if (slash == NULL)
    snprintf(dir, len, ".");
  else
    *slash = '\0';
  return 0;
}

int main(int argc, char **argv)
{
  part parts[] = {
      {"root", "imp-root-demo", {"root-circle.svg"}, "learned radius"},
      {"deq", "imp-deq-demo", {"deq-convergence.svg"}, "held-out loss"},
      {"ode", "imp-ode-demo", {"ode.svg"}, "  trajectory MAE"},
      {"qp", "imp-opt-demo", {NULL}, "   test puzzles"},
      {"stack", "imp-stack-demo", {NULL}, "loss "},
  };
  char self[PATH_LEN], dir[PATH_LEN] = "", tmpl[PATH_LEN];
  const char *tmp = getenv("TMPDIR");
  double start = now();
  int quick = 0, failures = 0;

  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc)
      snprintf(dir, sizeof dir, "%s", argv[++i]);
    else if (strcmp(argv[i], "--quick") == 0)
      quick = 1;
    else {
      fprintf(stderr, "usage: %s [--dir DIR] [--quick]\n", argv[0]);
      return EXIT_FAILURE;
    }
  }
  if (quick) {
    parts[2].args[0] = "--iters", parts[2].args[1] = "300";
    parts[2].args[2] = "ode.svg";
    parts[3].args[0] = "--epochs", parts[3].args[1] = "10";
  }

  /* Where the demos run and write their logs and figures. */
  self_dir(argv[0], self, sizeof self);
  if (dir[0] == '\0') {
    snprintf(tmpl, sizeof tmpl, "%s/imp-tour-XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
    if (mkdtemp(tmpl) == NULL) {
      fprintf(stderr, "imp-tour: cannot make %s: %s\n", tmpl, strerror(errno));
      return EXIT_FAILURE;
    }
    snprintf(dir, sizeof dir, "%s", tmpl);
  } else if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
    fprintf(stderr, "imp-tour: cannot make %s: %s\n", dir, strerror(errno));
    return EXIT_FAILURE;
  }
  printf("imp tour: every layer kind's demo, then the maze DEQ; logs and "
         "figures in %s\n\n",
         dir);
  printf("%-6s %-4s %7s  %s\n", "part", "", "wall", "key figure");
  fflush(stdout);

  /* The demos, one after the other. */
  for (size_t p = 0; p < sizeof parts / sizeof parts[0]; p++) {
    char bin[PATH_LEN], out[PATH_LEN], err[PATH_LEN], key[256];
    char *args[MAX_ARGS + 2] = {bin};
    double t0 = now();
    int rc;

    if (file_path(bin, sizeof bin, self, parts[p].binary, "") != 0 ||
        file_path(out, sizeof out, dir, parts[p].name, ".out") != 0 ||
        file_path(err, sizeof err, dir, parts[p].name, ".err") != 0) {
      fprintf(stderr, "imp-tour: path too long under %s\n", dir);
      return EXIT_FAILURE;
    }
    for (int a = 0; a < MAX_ARGS && parts[p].args[a] != NULL; a++)
      args[a + 1] = (char *)parts[p].args[a];
    rc = run(args, out, err, dir);
    find_line(out, parts[p].key, key, sizeof key);
    printf("%-6s %-4s %6.1fs  %s\n", parts[p].name, rc == 0 ? "ok" : "FAIL",
           now() - t0, rc == 0 ? key : "see the log");
    if (rc != 0) {
      printf("       (exit %d; %s, %s)\n", rc, out, err);
      failures++;
    }
    fflush(stdout);
  }

  /* The maze DEQ's inference with the shipped checkpoint. */
  {
    char key[256];
    double t0 = now();
    int rc = maze_part(self, dir, key, sizeof key);

    printf("%-6s %-4s %6.1fs  %s\n", "maze", rc == 0 ? "ok" : "FAIL",
           now() - t0, key[0] != '\0' ? key : "see maze.err");
    failures += rc != 0;
  }

  printf("\n%s: %d of %zu parts failed, %.1f s in all\n",
         failures == 0 ? "tour passed" : "TOUR FAILED", failures,
         sizeof parts / sizeof parts[0] + 1, now() - start);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
