/* DDP gradient buckets (Megatron's DistributedDataParallel): the flat gradient buffer is cut into
 * buckets of bucket_size elements from its end (backward finishes the last parameters first), and
 * each bucket's average over the data-parallel group starts as soon as backward has finished all
 * of its gradients (overlap_grad_reduce), on the communicator's background thread. */
#ifndef LT_DDP_H
#define LT_DDP_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"
#include "engine/core/tensor.h"

typedef struct lt_ddp lt_ddp;

/* grads: the flat fp32 gradient buffer (borrowed); bucket_size in elements (<= 0: one bucket). */
lt_ddp *lt_ddp_new(lt_tensor *grads, int64_t bucket_size, lt_comm *dp);
void lt_ddp_free(lt_ddp *d);
int lt_ddp_num_buckets(const lt_ddp *d);

/* Starts a step's reduction: no bucket is in flight yet. */
void lt_ddp_begin(lt_ddp *d);
/* Gradients at offsets >= first_ready are final: start every bucket lying wholly in that region
 * (matches lt_gpt_grad_ready_fn, so it can be the model's hook with d as user data). */
void lt_ddp_grads_ready(void *d, int64_t first_ready);
/* Starts what is left and waits for every bucket. 0, or -1 with the collective's message. */
int lt_ddp_finish(lt_ddp *d, char *err, size_t errlen);
/* Seconds the last finish spent waiting (the reduction time not hidden behind backward). */
double lt_ddp_wait_seconds(const lt_ddp *d);

#endif
