#include "engine/optim/optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/ops/backend.h"

struct lt_optimizer {
    lt_optim_config cfg;
    const lt_backend *be; /* where params live: the state lives and the update runs there too */
    lt_tensor *params, *grads;
    lt_optim_segment *segments;
    int num_segments;
    lt_tensor *state[2];
    int64_t steps;
};

static const char *const adam_state[] = {"exp_avg", "exp_avg_sq", NULL};
static const char *const sgd_state[] = {"momentum_buffer", NULL};

lt_optimizer *lt_optimizer_new(const lt_optim_config *cfg, lt_tensor *params, lt_tensor *grads,
                               const lt_optim_segment *segments, int num_segments) {
    lt_optimizer *o = calloc(1, sizeof *o);
    o->cfg = *cfg;
    o->be = lt_backend_of(params);
    o->params = params;
    o->grads = grads;
    o->segments = malloc(sizeof *segments * (size_t)num_segments);
    memcpy(o->segments, segments, sizeof *segments * (size_t)num_segments);
    o->num_segments = num_segments;
    int nstate = cfg->kind == LT_OPTIM_ADAM ? 2 : (cfg->momentum != 0 ? 1 : 0);
    for (int i = 0; i < nstate; i++) {
        o->state[i] = lt_backend_tensor(o->be, LT_F32, params->ndim, params->shape);
        if (!o->state[i]) {
            lt_optimizer_free(o);
            return NULL;
        }
    }
    return o;
}

void lt_optimizer_free(lt_optimizer *o) {
    if (!o) return;
    lt_tensor_free(o->state[0]);
    lt_tensor_free(o->state[1]);
    free(o->segments);
    free(o);
}

void lt_optimizer_step(lt_optimizer *o, float lr) {
    o->steps++;
    float *p = lt_tensor_data(o->params);
    const float *g = lt_tensor_data(o->grads);
    for (int i = 0; i < o->num_segments; i++) {
        const lt_optim_segment *s = &o->segments[i];
        float wd = s->no_weight_decay ? 0.0f : o->cfg.weight_decay;
        if (o->cfg.kind == LT_OPTIM_ADAM) {
            float *m = (float *)lt_tensor_data(o->state[0]) + s->offset;
            float *v = (float *)lt_tensor_data(o->state[1]) + s->offset;
            o->be->adamw_update(p + s->offset, g + s->offset, m, v, s->numel, lr, o->cfg.beta1, o->cfg.beta2,
                            o->cfg.eps, wd, o->steps);
        } else {
            float *buf = o->state[0] ? (float *)lt_tensor_data(o->state[0]) + s->offset : NULL;
            o->be->sgd_update(p + s->offset, g + s->offset, buf, s->numel, lr, o->cfg.momentum, wd);
        }
    }
}

int64_t lt_optimizer_num_steps(const lt_optimizer *o) { return o->steps; }
void lt_optimizer_set_num_steps(lt_optimizer *o, int64_t steps) { o->steps = steps; }

const char *const *lt_optimizer_state_names(const lt_optimizer *o) {
    if (o->cfg.kind == LT_OPTIM_ADAM) return adam_state;
    return o->state[0] ? sgd_state : sgd_state + 1;
}

lt_tensor *lt_optimizer_state(lt_optimizer *o, const char *name) {
    const char *const *names = lt_optimizer_state_names(o);
    for (int i = 0; names[i]; i++)
        if (strcmp(names[i], name) == 0) return o->state[i];
    return NULL;
}

double lt_clip_grad_norm(lt_tensor *grads, double max_norm) {
    const lt_backend *be = lt_backend_of(grads);
    float *g = lt_tensor_data(grads);
    int64_t n = lt_tensor_numel(grads);
    double norm = sqrt(be->sum_squares(g, n));
    /* Megatron: clip_coeff = max_norm / (norm + 1e-6), applied only when below 1. */
    if (max_norm > 0 && isfinite(norm)) {
        double coeff = max_norm / (norm + 1e-6);
        if (coeff < 1.0) be->scale(g, n, (float)coeff);
    }
    return norm;
}
