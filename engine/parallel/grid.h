/* The rank grid: which ranks form the tensor-, context-, data-, pipeline- and expert-parallel groups.
 * Pure arithmetic, no communication: every rank computes the same grid and creates communicators
 * (engine/comm) for the groups it belongs to, enumerating them in the same order.
 *
 * Megatron-Core semantics (megatron/core/parallel_state.py, order "tp-cp-ep-dp-pp", the first token
 * varying fastest; ranks are 0-based everywhere):
 * - Dense grid, DP = world / (TP*PP*CP):              rank = tp + TP*(cp + CP*(dp + DP*pp)).
 * - Expert grid, ETP defaults to TP, EDP = world / (ETP*EP*PP):
 *                                                     rank = etp + ETP*(ep + EP*(edp + EDP*pp)).
 * - With pp_before_dp (Megatron's use_tp_pp_dp_mapping, order "tp-cp-ep-pp-dp") the last two axes
 *   swap: rank = tp + TP*(cp + CP*(pp + PP*dp)), and likewise on the expert grid; then the dense and
 *   expert DP sizes must be equal when PP > 1 (so both grids have the same PP groups).
 *   The dense grid has no EP axis and the expert grid no CP axis, so CP > 1 with EP > 1 is allowed:
 *   CP folds into expert-DP.
 * - A group of a kind is the set of ranks whose coordinates agree on every axis outside the kind
 *   (e.g. a DP_CP group: same tp and pp). Groups are enumerated as Megatron's
 *   generate_masked_orthogonal_rank_groups yields them, which is ascending by smallest member; the
 *   members of a group are ascending.
 * - EMBEDDING: the first and last rank of each PP group, enumerated as the PP groups (just the one
 *   rank when PP = 1);
 *   POSITION_EMBEDDING: the first rank of each PP group. Ranks of the middle stages belong to none. */
#ifndef LT_PARALLEL_GRID_H
#define LT_PARALLEL_GRID_H
#include <stddef.h>

typedef struct {
    int world_size;
    int tp;  /* tensor_model_parallel_size */
    int pp;  /* pipeline_model_parallel_size */
    int cp;  /* context_parallel_size */
    int ep;  /* expert_model_parallel_size */
    int etp; /* expert_tensor_parallel_size; 0 = same as tp */
    int vpp; /* virtual_pipeline_model_parallel_size; 0 = none (needs pp > 1 when set) */
    int pp_before_dp; /* order tp-cp-ep-pp-dp instead of tp-cp-ep-dp-pp */
} lt_grid_config;

typedef struct {
    int world_size;
    int tp, pp, cp, dp; /* dense grid */
    int ep, etp, edp;   /* expert grid (and pp) */
    int vpp;            /* 0 = none */
    int pp_before_dp;   /* the order (see lt_grid_config) */
} lt_grid;

typedef enum {
    /* dense grid */
    LT_GROUP_TP = 0,
    LT_GROUP_CP,
    LT_GROUP_DP,
    LT_GROUP_PP,
    LT_GROUP_DP_CP, /* gradients are reduced over this */
    LT_GROUP_TP_PP, /* model parallel */
    LT_GROUP_TP_CP,
    LT_GROUP_TP_DP_CP,
    LT_GROUP_TP_DP,
    /* expert grid */
    LT_GROUP_EP,
    LT_GROUP_ETP,
    LT_GROUP_EDP,      /* expert data parallel */
    LT_GROUP_TP_EP,    /* ETP x EP */
    LT_GROUP_TP_EP_PP, /* ETP x EP x PP */
    /* from the PP groups */
    LT_GROUP_EMBEDDING,
    LT_GROUP_POSITION_EMBEDDING,
    LT_GROUP_COUNT
} lt_group_kind;

typedef struct {
    int rank;
    int tp_rank, cp_rank, dp_rank, pp_rank; /* dense grid */
    int etp_rank, ep_rank, edp_rank;        /* expert grid (pp_rank is shared) */
    int tp_size, cp_size, dp_size, pp_size; /* copies of the grid's sizes */
    int etp_size, ep_size, edp_size;
} lt_rank_coords;

/* Checks the layout (Megatron's checks, in its order) and fills g. Returns 0, or -1 with a message
 * naming the values in err (err may be NULL). */
int lt_grid_init(lt_grid *g, const lt_grid_config *cfg, char *err, size_t errlen);

/* "tp", "cp", "dp", "pp", "dp-cp", "tp-pp", "tp-cp", "tp-dp-cp", "tp-dp", "ep", "etp", "edp", "tp-ep",
 * "tp-ep-pp", "embedding", "position-embedding"; NULL for an invalid kind. */
const char *lt_group_kind_name(lt_group_kind kind);
/* The kind of a name above, or -1. */
int lt_group_kind_parse(const char *name);

/* Coordinates of rank (0 <= rank < world_size). Returns 0, or -1 for a rank out of range. */
int lt_grid_coords(const lt_grid *g, int rank, lt_rank_coords *c);
/* The rank at dense coordinates (tp, cp, dp, pp), or at expert coordinates (etp, ep, edp, pp);
 * -1 when a coordinate is out of range. */
int lt_grid_rank(const lt_grid *g, int tp_rank, int cp_rank, int dp_rank, int pp_rank);
int lt_grid_expert_rank(const lt_grid *g, int etp_rank, int ep_rank, int edp_rank, int pp_rank);

/* Members per group of a kind (EMBEDDING: 2, or 1 when PP = 1; POSITION_EMBEDDING: 1); 0 for an invalid kind. */
int lt_grid_group_size(const lt_grid *g, lt_group_kind kind);
/* Number of groups of a kind (world_size / group size; for the embedding kinds, the number of PP groups). */
int lt_grid_num_groups(const lt_grid *g, lt_group_kind kind);

/* The group of `kind` that contains `rank`: its members, ascending, into ranks (room for
 * lt_grid_group_size ints; world_size always suffices) and their count into *n. Returns the group's
 * index (as lt_grid_group_at numbers them), or -1 when the kind or rank is invalid or the rank is in no
 * group of that kind (embedding kinds, middle pipeline stages); then *n = 0. */
int lt_grid_group(const lt_grid *g, lt_group_kind kind, int rank, int *ranks, int *n);
/* The i-th group of `kind` (0 <= i < lt_grid_num_groups), in Megatron's creation order.
 * Returns 0, or -1 for an invalid kind or index (then *n = 0). */
int lt_grid_group_at(const lt_grid *g, lt_group_kind kind, int i, int *ranks, int *n);

#endif
