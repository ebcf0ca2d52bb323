/* DDP gradient buckets (Megatron's DistributedDataParallel): the flat gradient buffer is cut into
 * buckets of bucket_size elements from its end (backward finishes the last parameters first), and
 * each bucket's average over the data-parallel group starts as soon as backward has finished all
 * of its gradients (overlap_grad_reduce), on the communicator's background thread.
 *
 * Sharded buckets (the distributed optimizer): every bucket is split evenly over the DP ranks;
 * its gradients are reduce-scattered into this rank's piece of the fp32 main gradients, the
 * optimizer updates this rank's piece of the main parameters, and the bucket's parameters are
 * all-gathered back into the model's weights, bucket by bucket in forward order, so the next
 * forward can start on the first layers while later buckets still arrive (overlap_param_gather).
 * Main buffers are laid out in flat order: bucket [b0, b1)'s piece starts at b0 / DP.
 *
 * The main buffers live in the memory of the gradients (lt_backend_of) and are copied with that
 * backend's copy: with GPU gradients the communicator must move device memory (lt_comm_nccl), and
 * its "finished" requests are ordered on the GPU, not completed on the host (engine/comm/comm.h). */
#ifndef LT_DDP_H
#define LT_DDP_H
#include <stddef.h>
#include <stdint.h>

#include "engine/comm/comm.h"
#include "engine/core/tensor.h"

typedef struct lt_ddp lt_ddp;

/* grads: the flat fp32 gradient buffer (borrowed); bucket_size in elements (<= 0: one bucket). */
lt_ddp *lt_ddp_new(lt_tensor *grads, int64_t bucket_size, lt_comm *dp);
/* Sharded buckets over grads and weights (borrowed, same length, a multiple of 16 x DP: the model's
 * flat_multiple). NULL with err when the length does not divide or memory runs out. */
lt_ddp *lt_ddp_new_sharded(lt_tensor *grads, lt_tensor *weights, int64_t bucket_size, lt_comm *dp, char *err,
                           size_t errlen);
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

/* ---- sharded buckets only ---- */
/* This rank's main parameters and main gradients (length / DP elements; owned by d). */
lt_tensor *lt_ddp_main_params(lt_ddp *d);
lt_tensor *lt_ddp_main_grads(lt_ddp *d);
/* This rank's piece of bucket k (k < num_buckets): its flat range and its offset in the main buffers. */
void lt_ddp_piece(const lt_ddp *d, int k, int64_t *flat_first, int64_t *count, int64_t *main_offset);
/* Copies this rank's pieces of the weights into the main parameters (after init or a load). */
void lt_ddp_weights_to_main(lt_ddp *d);
/* Starts the all-gather of every bucket's parameters, in forward order. */
void lt_ddp_gather_params(lt_ddp *d);
/* Waits for the gathers of every bucket that starts below needed_end (lt_gpt_param_wait_fn). */
void lt_ddp_params_needed(void *d, int64_t needed_end);
/* Waits for every gather. 0, or -1 with the collective's message (also for a failure seen by the
 * hook, which cannot report it). */
int lt_ddp_params_finish(lt_ddp *d, char *err, size_t errlen);

#endif
