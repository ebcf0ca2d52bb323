/* When an op is worth an OpenMP team. */
#ifndef LT_OPS_PARALLEL_H
#define LT_OPS_PARALLEL_H

/* Below this many elements an op runs on the calling thread: waking the team and the closing barrier
 * cost more than the work, and a small model's step is mostly such ops. */
#define LT_PAR_MIN 32768

#endif
