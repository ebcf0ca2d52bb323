/* The rank grid (see grid.h): Megatron's RankGenerator and generate_masked_orthogonal_rank_groups,
 * computed per group instead of materializing every list. */
#include "engine/core/error.h"
#include "engine/parallel/grid.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* The axes in Megatron's default order "tp-cp-ep-dp-pp" (first varies fastest). The dense grid has
 * ep = 1, the expert grid cp = 1 (and tp = etp, dp = edp). */
enum { AX_TP = 0, AX_CP, AX_EP, AX_DP, AX_PP, AX_COUNT };
#define M(a) (1u << (a))

enum { GRID_DENSE, GRID_EXPERT, GRID_PP_ENDS };

static const struct {
    const char *name;
    int grid;
    unsigned mask; /* the axes that vary inside a group */
} kinds[LT_GROUP_COUNT] = {
    [LT_GROUP_TP] = {"tp", GRID_DENSE, M(AX_TP)},
    [LT_GROUP_CP] = {"cp", GRID_DENSE, M(AX_CP)},
    [LT_GROUP_DP] = {"dp", GRID_DENSE, M(AX_DP)},
    [LT_GROUP_PP] = {"pp", GRID_DENSE, M(AX_PP)},
    [LT_GROUP_DP_CP] = {"dp-cp", GRID_DENSE, M(AX_DP) | M(AX_CP)},
    [LT_GROUP_TP_PP] = {"tp-pp", GRID_DENSE, M(AX_TP) | M(AX_PP)},
    [LT_GROUP_TP_CP] = {"tp-cp", GRID_DENSE, M(AX_TP) | M(AX_CP)},
    [LT_GROUP_TP_DP_CP] = {"tp-dp-cp", GRID_DENSE, M(AX_TP) | M(AX_DP) | M(AX_CP)},
    [LT_GROUP_TP_DP] = {"tp-dp", GRID_DENSE, M(AX_TP) | M(AX_DP)},
    [LT_GROUP_EP] = {"ep", GRID_EXPERT, M(AX_EP)},
    [LT_GROUP_ETP] = {"etp", GRID_EXPERT, M(AX_TP)},
    [LT_GROUP_EDP] = {"edp", GRID_EXPERT, M(AX_DP)},
    [LT_GROUP_TP_EP] = {"tp-ep", GRID_EXPERT, M(AX_TP) | M(AX_EP)},
    [LT_GROUP_TP_EP_PP] = {"tp-ep-pp", GRID_EXPERT, M(AX_TP) | M(AX_EP) | M(AX_PP)},
    [LT_GROUP_EMBEDDING] = {"embedding", GRID_PP_ENDS, M(AX_PP)},
    [LT_GROUP_POSITION_EMBEDDING] = {"position-embedding", GRID_PP_ENDS, M(AX_PP)},
};

static int valid_kind(lt_group_kind kind) { return (int)kind >= 0 && kind < LT_GROUP_COUNT; }

const char *lt_group_kind_name(lt_group_kind kind) { return valid_kind(kind) ? kinds[kind].name : NULL; }

int lt_group_kind_parse(const char *name) {
    if (!name)
        return -1;
    for (int k = 0; k < LT_GROUP_COUNT; k++)
        if (strcmp(kinds[k].name, name) == 0)
            return k;
    return -1;
}

int lt_grid_init(lt_grid *g, const lt_grid_config *cfg, char *err, size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    memset(g, 0, sizeof *g);
    const struct {
        const char *name;
        int value, min;
    } sizes[] = {
        {"world_size", cfg->world_size, 1},
        {"tensor_model_parallel_size", cfg->tp, 1},
        {"pipeline_model_parallel_size", cfg->pp, 1},
        {"context_parallel_size", cfg->cp, 1},
        {"expert_model_parallel_size", cfg->ep, 1},
        {"expert_tensor_parallel_size", cfg->etp, 0},          /* 0: same as tp */
        {"virtual_pipeline_model_parallel_size", cfg->vpp, 0}, /* 0: none */
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i].value < sizes[i].min)
            return lt_fail(err, errlen, "%s must be >= %d (got %d)", sizes[i].name, sizes[i].min, sizes[i].value);

    int64_t world = cfg->world_size;
    int64_t model_size = (int64_t)cfg->tp * cfg->pp * cfg->cp;
    if (world % model_size != 0)
        return lt_fail(err, errlen,
                    "world_size (%d) is not divisible by tensor_model_parallel_size (%d) x "
                    "pipeline_model_parallel_size (%d) x context_parallel_size (%d) = %lld",
                    cfg->world_size, cfg->tp, cfg->pp, cfg->cp, (long long)model_size);
    if (cfg->vpp > 0 && cfg->pp <= 1)
        return lt_fail(err, errlen,
                    "virtual_pipeline_model_parallel_size (%d) needs pipeline_model_parallel_size > 1 "
                    "(got %d): the interleaved schedule runs only with pipeline parallelism",
                    cfg->vpp, cfg->pp);
    int etp = cfg->etp ? cfg->etp : cfg->tp;
    int64_t expert_size = (int64_t)etp * cfg->ep * cfg->pp;
    if (world % expert_size != 0)
        return lt_fail(err, errlen,
                    "world_size (%d) is not divisible by expert_tensor_parallel_size (%d%s) x "
                    "expert_model_parallel_size (%d) x pipeline_model_parallel_size (%d) = %lld",
                    cfg->world_size, etp, cfg->etp ? "" : ", from tensor_model_parallel_size", cfg->ep, cfg->pp,
                    (long long)expert_size);
    /* Megatron also requires equal dense and expert PP groups, and equal dense and expert DP sizes
     * unless pp is the last axis: with the pp-last order used here both hold by construction
     * (rank = inner + world/PP * pp on both grids). */
    g->world_size = cfg->world_size;
    g->tp = cfg->tp;
    g->pp = cfg->pp;
    g->cp = cfg->cp;
    g->dp = (int)(world / model_size);
    g->ep = cfg->ep;
    g->etp = etp;
    g->edp = (int)(world / expert_size);
    g->vpp = cfg->vpp;
    return 0;
}

/* Axis sizes and strides of the grid a kind lives on. */
static void axes(const lt_grid *g, int grid, int *size, int *stride) {
    if (grid == GRID_EXPERT) {
        size[AX_TP] = g->etp, size[AX_CP] = 1, size[AX_EP] = g->ep, size[AX_DP] = g->edp;
    } else {
        size[AX_TP] = g->tp, size[AX_CP] = g->cp, size[AX_EP] = 1, size[AX_DP] = g->dp;
    }
    size[AX_PP] = g->pp;
    int s = 1;
    for (int a = 0; a < AX_COUNT; a++)
        stride[a] = s, s *= size[a];
}

int lt_grid_coords(const lt_grid *g, int rank, lt_rank_coords *c) {
    if (rank < 0 || rank >= g->world_size)
        return -1;
    int tp_cp = g->tp * g->cp, etp_ep = g->etp * g->ep, per_stage = g->world_size / g->pp;
    c->rank = rank;
    c->tp_rank = rank % g->tp;
    c->cp_rank = rank / g->tp % g->cp;
    c->dp_rank = rank / tp_cp % g->dp;
    c->pp_rank = rank / per_stage;
    c->etp_rank = rank % g->etp;
    c->ep_rank = rank / g->etp % g->ep;
    c->edp_rank = rank / etp_ep % g->edp;
    c->tp_size = g->tp, c->cp_size = g->cp, c->dp_size = g->dp, c->pp_size = g->pp;
    c->etp_size = g->etp, c->ep_size = g->ep, c->edp_size = g->edp;
    return 0;
}

int lt_grid_rank(const lt_grid *g, int tp_rank, int cp_rank, int dp_rank, int pp_rank) {
    if (tp_rank < 0 || tp_rank >= g->tp || cp_rank < 0 || cp_rank >= g->cp || dp_rank < 0 || dp_rank >= g->dp ||
        pp_rank < 0 || pp_rank >= g->pp)
        return -1;
    return tp_rank + g->tp * (cp_rank + g->cp * (dp_rank + g->dp * pp_rank));
}

int lt_grid_expert_rank(const lt_grid *g, int etp_rank, int ep_rank, int edp_rank, int pp_rank) {
    if (etp_rank < 0 || etp_rank >= g->etp || ep_rank < 0 || ep_rank >= g->ep || edp_rank < 0 || edp_rank >= g->edp ||
        pp_rank < 0 || pp_rank >= g->pp)
        return -1;
    return etp_rank + g->etp * (ep_rank + g->ep * (edp_rank + g->edp * pp_rank));
}

int lt_grid_group_size(const lt_grid *g, lt_group_kind kind) {
    if (!valid_kind(kind))
        return 0;
    if (kind == LT_GROUP_EMBEDDING)
        return g->pp > 1 ? 2 : 1;
    if (kind == LT_GROUP_POSITION_EMBEDDING)
        return 1;
    int size[AX_COUNT], stride[AX_COUNT], n = 1;
    axes(g, kinds[kind].grid, size, stride);
    for (int a = 0; a < AX_COUNT; a++)
        if (kinds[kind].mask & M(a))
            n *= size[a];
    return n;
}

int lt_grid_num_groups(const lt_grid *g, lt_group_kind kind) {
    if (!valid_kind(kind))
        return 0;
    if (kinds[kind].grid == GRID_PP_ENDS)
        return g->world_size / g->pp;
    return g->world_size / lt_grid_group_size(g, kind);
}

/* generate_masked_orthogonal_rank_groups for one group: the group index decomposes over the unmasked
 * axes and the member index over the masked ones (first axis fastest); rank = sum(index * stride). */
static void orthogonal_group(const lt_grid *g, int grid, unsigned mask, int i, int *ranks, int *n) {
    int size[AX_COUNT], stride[AX_COUNT], base = 0, count = 1;
    axes(g, grid, size, stride);
    for (int a = 0; a < AX_COUNT; a++) {
        if (mask & M(a)) {
            count *= size[a];
        } else {
            base += i % size[a] * stride[a];
            i /= size[a];
        }
    }
    for (int j = 0; j < count; j++) {
        int r = base, k = j;
        for (int a = 0; a < AX_COUNT; a++) {
            if (!(mask & M(a)))
                continue;
            r += k % size[a] * stride[a];
            k /= size[a];
        }
        ranks[j] = r;
    }
    *n = count;
}

int lt_grid_group_at(const lt_grid *g, lt_group_kind kind, int i, int *ranks, int *n) {
    *n = 0;
    if (!valid_kind(kind) || i < 0 || i >= lt_grid_num_groups(g, kind))
        return -1;
    if (kinds[kind].grid != GRID_PP_ENDS) {
        orthogonal_group(g, kinds[kind].grid, kinds[kind].mask, i, ranks, n);
        return 0;
    }
    /* Rank i + k * world/PP is stage k of PP group i. */
    int per_stage = g->world_size / g->pp;
    ranks[0] = i;
    *n = 1;
    if (kind == LT_GROUP_EMBEDDING && g->pp > 1)
        ranks[(*n)++] = i + (g->pp - 1) * per_stage;
    return 0;
}

int lt_grid_group(const lt_grid *g, lt_group_kind kind, int rank, int *ranks, int *n) {
    *n = 0;
    if (!valid_kind(kind) || rank < 0 || rank >= g->world_size)
        return -1;
    int grid = kinds[kind].grid, index;
    if (grid == GRID_PP_ENDS) {
        int per_stage = g->world_size / g->pp, stage = rank / per_stage;
        int member = stage == 0 || (kind == LT_GROUP_EMBEDDING && stage == g->pp - 1);
        if (!member)
            return -1;
        index = rank % per_stage;
    } else {
        /* The group index is the rank's coordinates on the unmasked axes, read as a mixed-radix number. */
        int size[AX_COUNT], stride[AX_COUNT], scale = 1;
        axes(g, grid, size, stride);
        index = 0;
        for (int a = 0; a < AX_COUNT; a++) {
            if (kinds[kind].mask & M(a))
                continue;
            index += rank / stride[a] % size[a] * scale;
            scale *= size[a];
        }
    }
    lt_grid_group_at(g, kind, index, ranks, n);
    return index;
}
