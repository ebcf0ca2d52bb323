/* AdamW and SGD over a flat parameter buffer split into segments (one per parameter),
 * each with its own weight-decay flag. State lives in flat buffers of the same layout, so
 * it saves, loads and (later) shards like the parameters themselves. */
#ifndef LT_OPTIMIZER_H
#define LT_OPTIMIZER_H
#include <stdint.h>

#include "engine/core/tensor.h"

typedef enum { LT_OPTIM_ADAM = 0, LT_OPTIM_SGD = 1 } lt_optim_kind;

typedef struct {
    lt_optim_kind kind;
    float beta1, beta2, eps; /* adam */
    float momentum;          /* sgd */
    float weight_decay;
} lt_optim_config;

typedef struct {
    int64_t offset, numel;
    int no_weight_decay;
} lt_optim_segment;

typedef struct lt_optimizer lt_optimizer;

/* params/grads: flat fp32 tensors of equal size (borrowed; must outlive the optimizer). */
lt_optimizer *lt_optimizer_new(const lt_optim_config *cfg, lt_tensor *params, lt_tensor *grads,
                               const lt_optim_segment *segments, int num_segments);
void lt_optimizer_free(lt_optimizer *o);
/* One update with learning rate lr (the scheduler's value for this step). */
void lt_optimizer_step(lt_optimizer *o, float lr);
int64_t lt_optimizer_num_steps(const lt_optimizer *o);
void lt_optimizer_set_num_steps(lt_optimizer *o, int64_t steps);
/* State buffers by name ("exp_avg", "exp_avg_sq" for adam; "momentum_buffer" for sgd); NULL if none. */
lt_tensor *lt_optimizer_state(lt_optimizer *o, const char *name);
const char *const *lt_optimizer_state_names(const lt_optimizer *o); /* NULL-terminated */

/* Global L2 norm of the gradients; when max_norm > 0 and the norm exceeds it, scales them down to
 * max_norm (Megatron's clip_grad_norm). Returns the norm before clipping. */
double lt_clip_grad_norm(lt_tensor *grads, double max_norm);

#endif
