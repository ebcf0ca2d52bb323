/* The rank grid (see grid.h): Megatron's RankGenerator and generate_masked_orthogonal_rank_groups,
 * computed per group instead of materializing every list. */
#include "engine/core/error.h"
#include "engine/parallel/grid.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* The axes. The dense grid has ep = 1, the expert grid cp = 1 (and tp = etp, dp = edp). */
enum { AX_TP = 0, AX_CP, AX_EP, AX_DP, AX_PP, AX_COUNT };
#define M(a) (1u << (a))

/* Megatron's orders, first axis varying fastest: "tp-cp-ep-dp-pp" and "tp-cp-ep-pp-dp". */
static const int ORDER_PP_LAST[AX_COUNT] = {AX_TP, AX_CP, AX_EP, AX_DP, AX_PP};
static const int ORDER_DP_LAST[AX_COUNT] = {AX_TP, AX_CP, AX_EP, AX_PP, AX_DP};
static const int *order_of(const lt_grid *g) { return g->pp_before_dp ? ORDER_DP_LAST : ORDER_PP_LAST; }

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
    /* Megatron also requires equal dense and expert PP groups: with pp last they are equal by
     * construction (rank = inner + world/PP * pp on both grids); with dp last they are when the DP
     * sizes are (the PP stride is then world / (PP * DP) on both). */
    int64_t dp = world / model_size, edp = world / expert_size;
    if (cfg->pp_before_dp && cfg->pp > 1 && dp != edp)
        return lt_fail(err, errlen,
                    "When not using pp-last rank ordering, the data parallel size of the attention and moe layers "
                    "must be the same: use_tp_pp_dp_mapping gives data parallel size %lld but expert data parallel "
                    "size %lld",
                    (long long)dp, (long long)edp);
    g->world_size = cfg->world_size;
    g->tp = cfg->tp;
    g->pp = cfg->pp;
    g->cp = cfg->cp;
    g->dp = (int)dp;
    g->ep = cfg->ep;
    g->etp = etp;
    g->edp = (int)edp;
    g->vpp = cfg->vpp;
    g->pp_before_dp = cfg->pp_before_dp ? 1 : 0;
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
    const int *order = order_of(g);
    int s = 1;
    for (int p = 0; p < AX_COUNT; p++)
        stride[order[p]] = s, s *= size[order[p]];
}

int lt_grid_coords(const lt_grid *g, int rank, lt_rank_coords *c) {
    if (rank < 0 || rank >= g->world_size)
        return -1;
    int size[AX_COUNT], stride[AX_COUNT], esize[AX_COUNT], estride[AX_COUNT];
    axes(g, GRID_DENSE, size, stride);
    axes(g, GRID_EXPERT, esize, estride);
#define COORD(a, sz, st) (rank / st[a] % sz[a])
    c->rank = rank;
    c->tp_rank = COORD(AX_TP, size, stride);
    c->cp_rank = COORD(AX_CP, size, stride);
    c->dp_rank = COORD(AX_DP, size, stride);
    c->pp_rank = COORD(AX_PP, size, stride);
    c->etp_rank = COORD(AX_TP, esize, estride);
    c->ep_rank = COORD(AX_EP, esize, estride);
    c->edp_rank = COORD(AX_DP, esize, estride);
#undef COORD
    c->tp_size = g->tp, c->cp_size = g->cp, c->dp_size = g->dp, c->pp_size = g->pp;
    c->etp_size = g->etp, c->ep_size = g->ep, c->edp_size = g->edp;
    return 0;
}

int lt_grid_rank(const lt_grid *g, int tp_rank, int cp_rank, int dp_rank, int pp_rank) {
    if (tp_rank < 0 || tp_rank >= g->tp || cp_rank < 0 || cp_rank >= g->cp || dp_rank < 0 || dp_rank >= g->dp ||
        pp_rank < 0 || pp_rank >= g->pp)
        return -1;
    int size[AX_COUNT], stride[AX_COUNT];
    axes(g, GRID_DENSE, size, stride);
    return tp_rank * stride[AX_TP] + cp_rank * stride[AX_CP] + dp_rank * stride[AX_DP] + pp_rank * stride[AX_PP];
}

int lt_grid_expert_rank(const lt_grid *g, int etp_rank, int ep_rank, int edp_rank, int pp_rank) {
    if (etp_rank < 0 || etp_rank >= g->etp || ep_rank < 0 || ep_rank >= g->ep || edp_rank < 0 || edp_rank >= g->edp ||
        pp_rank < 0 || pp_rank >= g->pp)
        return -1;
    int size[AX_COUNT], stride[AX_COUNT];
    axes(g, GRID_EXPERT, size, stride);
    return etp_rank * stride[AX_TP] + ep_rank * stride[AX_EP] + edp_rank * stride[AX_DP] + pp_rank * stride[AX_PP];
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

/* generate_masked_orthogonal_rank_groups for one member: the group index i decomposes over the
 * unmasked axes and the member index j over the masked ones (first axis of the order fastest);
 * rank = sum(index * stride). */
static int orthogonal_member(const lt_grid *g, int grid, unsigned mask, int i, int j) {
    int size[AX_COUNT], stride[AX_COUNT], r = 0;
    axes(g, grid, size, stride);
    const int *order = order_of(g);
    for (int p = 0; p < AX_COUNT; p++) {
        int a = order[p];
        int *k = (mask & M(a)) ? &j : &i;
        r += *k % size[a] * stride[a];
        *k /= size[a];
    }
    return r;
}

static void orthogonal_group(const lt_grid *g, int grid, unsigned mask, int i, int *ranks, int *n) {
    int size[AX_COUNT], stride[AX_COUNT], count = 1;
    axes(g, grid, size, stride);
    for (int a = 0; a < AX_COUNT; a++)
        if (mask & M(a))
            count *= size[a];
    for (int j = 0; j < count; j++)
        ranks[j] = orthogonal_member(g, grid, mask, i, j);
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
    /* The ends of the i-th PP group: its first stage, and its last for the embedding. */
    ranks[0] = orthogonal_member(g, GRID_DENSE, M(AX_PP), i, 0);
    *n = 1;
    if (kind == LT_GROUP_EMBEDDING && g->pp > 1)
        ranks[(*n)++] = orthogonal_member(g, GRID_DENSE, M(AX_PP), i, g->pp - 1);
    return 0;
}

/* The index of rank's group on a grid: its coordinates on the axes outside mask, read as a
 * mixed-radix number in the grid's order. */
static int group_index(const lt_grid *g, int grid, unsigned mask, int rank) {
    int size[AX_COUNT], stride[AX_COUNT], scale = 1, index = 0;
    axes(g, grid, size, stride);
    const int *order = order_of(g);
    for (int p = 0; p < AX_COUNT; p++) {
        int a = order[p];
        if (mask & M(a))
            continue;
        index += rank / stride[a] % size[a] * scale;
        scale *= size[a];
    }
    return index;
}

int lt_grid_group(const lt_grid *g, lt_group_kind kind, int rank, int *ranks, int *n) {
    *n = 0;
    if (!valid_kind(kind) || rank < 0 || rank >= g->world_size)
        return -1;
    int index;
    if (kinds[kind].grid == GRID_PP_ENDS) {
        lt_rank_coords c;
        lt_grid_coords(g, rank, &c);
        int member = c.pp_rank == 0 || (kind == LT_GROUP_EMBEDDING && c.pp_rank == g->pp - 1);
        if (!member)
            return -1;
        index = group_index(g, GRID_DENSE, M(AX_PP), rank);
    } else {
        index = group_index(g, kinds[kind].grid, kinds[kind].mask, rank);
    }
    lt_grid_group_at(g, kind, index, ranks, n);
    return index;
}
