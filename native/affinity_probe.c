/* affinity_probe: report where each OpenMP worker thread actually runs.
 *
 * Started by phi_rnn.affinity.verify() under the same environment as the trainer
 * (OMP_PLACES, OMP_PROC_BIND, OMP_NUM_THREADS, KMP_AFFINITY, ...).  Every thread of
 * one parallel region records its OpenMP thread number, the CPU it is on
 * (sched_getcpu) and its allowed-CPU mask (sched_getaffinity); a barrier keeps all
 * threads alive at once so each one is a distinct OS thread.  Prints one JSON object.
 *
 * Built with gcc -fopenmp it uses libgomp, the runtime numba and MKL (GNU layer)
 * share; LD_PRELOAD=libiomp5.so runs it on the Intel runtime instead.  The
 * "runtime" field names the library that actually provides omp_get_num_threads.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <omp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_CPUS 8192

typedef struct {
    int thread;
    int cpu;
    int n_allowed;
    int *allowed;
} ThreadReport;

static int allowed_cpus(int *out) {
    size_t size = CPU_ALLOC_SIZE(MAX_CPUS);
    cpu_set_t *mask = CPU_ALLOC(MAX_CPUS);
    int n = 0;
    CPU_ZERO_S(size, mask);
    if (sched_getaffinity(0, size, mask) == 0)
        for (int cpu = 0; cpu < MAX_CPUS; cpu++)
            if (CPU_ISSET_S(cpu, size, mask)) out[n++] = cpu;
    CPU_FREE(mask);
    return n;
}

static const char *runtime_library(void) {
    Dl_info info;
    if (dladdr((void *)omp_get_num_threads, &info) && info.dli_fname) return info.dli_fname;
    return "unknown";
}

static void print_int_list(const int *values, int n) {
    putchar('[');
    for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", values[i]);
    putchar(']');
}

int main(void) {
    int max_threads = omp_get_max_threads();
    ThreadReport *reports = calloc((size_t)max_threads, sizeof *reports);
    int team_size = 0;
    if (!reports) return 1;

#pragma omp parallel
    {
        int me = omp_get_thread_num();
#pragma omp single
        team_size = omp_get_num_threads();
        /* implicit barrier after single: every thread is running before anyone records */
        ThreadReport *r = &reports[me];
        r->thread = me;
        r->cpu = sched_getcpu();
        r->allowed = malloc(MAX_CPUS * sizeof(int));
        r->n_allowed = r->allowed ? allowed_cpus(r->allowed) : 0;
#pragma omp barrier
    }

    printf("{\"runtime\": \"%s\", \"num_threads\": %d, \"max_active_levels\": %d, "
           "\"proc_bind\": %d, \"num_places\": %d, \"threads\": [",
           runtime_library(), team_size, omp_get_max_active_levels(),
           (int)omp_get_proc_bind(), omp_get_num_places());
    for (int i = 0; i < team_size; i++) {
        printf(i ? ", " : "");
        printf("{\"thread\": %d, \"cpu\": %d, \"allowed\": ", reports[i].thread, reports[i].cpu);
        print_int_list(reports[i].allowed, reports[i].n_allowed);
        putchar('}');
        free(reports[i].allowed);
    }
    printf("]}\n");
    free(reports);
    return 0;
}
