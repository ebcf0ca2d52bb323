/* The rank grid (engine/parallel/grid.h):
 * - Example A and Example B of MEGATRON_SEMANTICS.md section 1, every listed group list exactly, in order;
 * - several layouts against an independent brute force: enumerate every rank's coordinates from
 *   rank = tp + TP*(cp + CP*(dp + DP*pp)) and rank = etp + ETP*(ep + EP*(edp + EDP*pp)) with nested loops,
 *   and group ranks whose coordinates outside the group's axes are equal;
 * - coordinate round trips, one group per rank and kind, group sizes and counts, kind names;
 * - the error messages of invalid layouts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/parallel/grid.h"
#include "tests/tap.h"

#define MAXW 64

static lt_grid make(int world, int tp, int pp, int cp, int ep, int etp, int vpp) {
    lt_grid_config cfg = {world, tp, pp, cp, ep, etp, vpp};
    lt_grid g;
    char err[256];
    if (lt_grid_init(&g, &cfg, err, sizeof err) != 0) {
        printf("# unexpected error: %s\n", err);
        memset(&g, 0, sizeof g);
    }
    return g;
}

/* Groups written as in MEGATRON_SEMANTICS.md: "[0,1] [2,3]", with "a..b" for a range. Returns the number
 * of groups; sizes[i] members each, flattened into members. */
static int parse_groups(const char *s, int *members, int *sizes) {
    int ng = 0, nm = 0;
    while ((s = strchr(s, '['))) {
        s++;
        sizes[ng] = 0;
        while (*s != ']') {
            char *end;
            long a = strtol(s, &end, 10), b = a;
            s = end;
            if (s[0] == '.' && s[1] == '.')
                b = strtol(s + 2, &end, 10), s = end;
            for (long v = a; v <= b; v++)
                members[nm++] = (int)v, sizes[ng]++;
            if (*s == ',')
                s++;
            while (*s == ' ')
                s++;
        }
        ng++;
    }
    return ng;
}

static void print_groups(const lt_grid *g, lt_group_kind kind) {
    int ranks[MAXW], n;
    printf("#   %s:", lt_group_kind_name(kind));
    for (int i = 0; i < lt_grid_num_groups(g, kind); i++) {
        lt_grid_group_at(g, kind, i, ranks, &n);
        printf(" [");
        for (int j = 0; j < n; j++)
            printf(j ? ",%d" : "%d", ranks[j]);
        printf("]");
    }
    printf("\n");
}

/* lt_grid_group_at enumerates exactly `expected`, in that order. */
static void expect_groups(const char *layout, const lt_grid *g, lt_group_kind kind, const char *expected) {
    int members[MAXW * MAXW], sizes[MAXW * MAXW];
    int ng = parse_groups(expected, members, sizes);
    int ok = lt_grid_num_groups(g, kind) == ng, at = 0;
    for (int i = 0; ok && i < ng; i++) {
        int ranks[MAXW], n;
        ok = lt_grid_group_at(g, kind, i, ranks, &n) == 0 && n == sizes[i] &&
             !memcmp(ranks, members + at, n * sizeof(int));
        at += sizes[i];
    }
    TAP_CHECK(ok, "%s: %s groups are %s", layout, lt_group_kind_name(kind), expected);
    if (!ok)
        print_groups(g, kind);
}

static void example_a(void) {
    lt_grid g = make(16, 2, 2, 2, 1, 0, 0);
    const char *L = "A (world 16, TP2 CP2 PP2)";
    TAP_CHECK(g.dp == 2 && g.edp == 4 && g.etp == 2 && g.ep == 1, "%s: DP 2, expert DP 4, ETP 2 (got %d %d %d)", L,
              g.dp, g.edp, g.etp);
    expect_groups(L, &g, LT_GROUP_TP, "[0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]");
    expect_groups(L, &g, LT_GROUP_CP, "[0,2] [1,3] [4,6] [5,7] [8,10] [9,11] [12,14] [13,15]");
    expect_groups(L, &g, LT_GROUP_DP, "[0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]");
    expect_groups(L, &g, LT_GROUP_PP, "[0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]");
    expect_groups(L, &g, LT_GROUP_DP_CP, "[0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]");
    expect_groups(L, &g, LT_GROUP_TP_PP, "[0,1,8,9] [2,3,10,11] [4,5,12,13] [6,7,14,15]");
    expect_groups(L, &g, LT_GROUP_TP_CP, "[0..3] [4..7] [8..11] [12..15]");
    expect_groups(L, &g, LT_GROUP_TP_DP_CP, "[0..7] [8..15]");
    expect_groups(L, &g, LT_GROUP_TP_DP, "[0,1,4,5] [2,3,6,7] [8,9,12,13] [10,11,14,15]");
    /* CP folds into expert DP: the expert-DP groups are the DP-CP groups. */
    expect_groups(L, &g, LT_GROUP_EDP, "[0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]");
    expect_groups(L, &g, LT_GROUP_EP, "[0] [1] [2] [3] [4] [5] [6] [7] [8] [9] [10] [11] [12] [13] [14] [15]");
    expect_groups(L, &g, LT_GROUP_ETP, "[0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]");
    expect_groups(L, &g, LT_GROUP_EMBEDDING, "[0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]");
    expect_groups(L, &g, LT_GROUP_POSITION_EMBEDDING, "[0] [1] [2] [3] [4] [5] [6] [7]");

    /* The group of one rank, and its index. */
    int ranks[MAXW], n;
    int idx = lt_grid_group(&g, LT_GROUP_DP_CP, 11, ranks, &n);
    TAP_CHECK(idx == 3 && n == 4 && ranks[0] == 9 && ranks[1] == 11 && ranks[2] == 13 && ranks[3] == 15,
              "A: rank 11's dp-cp group is group 3, [9,11,13,15]");
    lt_rank_coords c;
    lt_grid_coords(&g, 11, &c);
    TAP_CHECK(c.tp_rank == 1 && c.cp_rank == 1 && c.dp_rank == 0 && c.pp_rank == 1 && c.etp_rank == 1 &&
                  c.ep_rank == 0 && c.edp_rank == 1 && c.dp_size == 2 && c.edp_size == 4,
              "A: rank 11 is tp 1, cp 1, dp 0, pp 1; etp 1, ep 0, edp 1");
}

static void example_b(void) {
    const char *L = "B (world 8, TP2 EP4 ETP2)";
    lt_grid g = make(8, 2, 1, 1, 4, 2, 0);
    TAP_CHECK(g.dp == 4 && g.edp == 1, "%s: DP 4, expert DP 1", L);
    expect_groups(L, &g, LT_GROUP_TP, "[0,1] [2,3] [4,5] [6,7]");
    expect_groups(L, &g, LT_GROUP_DP, "[0,2,4,6] [1,3,5,7]");
    expect_groups(L, &g, LT_GROUP_ETP, "[0,1] [2,3] [4,5] [6,7]");
    expect_groups(L, &g, LT_GROUP_EP, "[0,2,4,6] [1,3,5,7]");
    expect_groups(L, &g, LT_GROUP_EDP, "[0] [1] [2] [3] [4] [5] [6] [7]");
    expect_groups(L, &g, LT_GROUP_TP_EP, "[0..7]");
    expect_groups(L, &g, LT_GROUP_TP_EP_PP, "[0..7]");
    expect_groups(L, &g, LT_GROUP_EMBEDDING, "[0] [1] [2] [3] [4] [5] [6] [7]");

    L = "B (world 8, TP2 EP4 ETP1)";
    g = make(8, 2, 1, 1, 4, 1, 0);
    TAP_CHECK(g.dp == 4 && g.edp == 2 && g.etp == 1, "%s: DP 4, expert DP 2", L);
    expect_groups(L, &g, LT_GROUP_TP, "[0,1] [2,3] [4,5] [6,7]");
    expect_groups(L, &g, LT_GROUP_DP, "[0,2,4,6] [1,3,5,7]");
    expect_groups(L, &g, LT_GROUP_EP, "[0..3] [4..7]");
    expect_groups(L, &g, LT_GROUP_EDP, "[0,4] [1,5] [2,6] [3,7]");
    expect_groups(L, &g, LT_GROUP_ETP, "[0] [1] [2] [3] [4] [5] [6] [7]");
    expect_groups(L, &g, LT_GROUP_TP_EP, "[0..3] [4..7]");

    L = "B (world 16, TP2 PP2 EP4 ETP1)";
    g = make(16, 2, 2, 1, 4, 1, 0);
    TAP_CHECK(g.dp == 4 && g.edp == 2, "%s: DP 4, expert DP 2", L);
    expect_groups(L, &g, LT_GROUP_EP, "[0..3] [4..7] [8..11] [12..15]");
    expect_groups(L, &g, LT_GROUP_EDP, "[0,4] [1,5] [2,6] [3,7] [8,12] [9,13] [10,14] [11,15]");
    expect_groups(L, &g, LT_GROUP_PP, "[0,8] [1,9] [2,10] [3,11] [4,12] [5,13] [6,14] [7,15]");
    expect_groups(L, &g, LT_GROUP_TP_EP_PP, "[0..3,8..11] [4..7,12..15]");
    expect_groups(L, &g, LT_GROUP_TP_EP, "[0..3] [4..7] [8..11] [12..15]");
}

/* Brute force: the coordinates of every rank from the rank formulas by nested loops, and each kind as
 * (grid, the coordinates that vary inside a group). Coordinate order: dense tp, cp, dp, pp; expert
 * etp, ep, edp, pp. */
static const struct {
    lt_group_kind kind;
    int expert;
    int vary[4];
} brute_kinds[] = {
    {LT_GROUP_TP, 0, {1, 0, 0, 0}},    {LT_GROUP_CP, 0, {0, 1, 0, 0}},       {LT_GROUP_DP, 0, {0, 0, 1, 0}},
    {LT_GROUP_PP, 0, {0, 0, 0, 1}},    {LT_GROUP_DP_CP, 0, {0, 1, 1, 0}},    {LT_GROUP_TP_PP, 0, {1, 0, 0, 1}},
    {LT_GROUP_TP_CP, 0, {1, 1, 0, 0}}, {LT_GROUP_TP_DP_CP, 0, {1, 1, 1, 0}}, {LT_GROUP_TP_DP, 0, {1, 0, 1, 0}},
    {LT_GROUP_EP, 1, {0, 1, 0, 0}},    {LT_GROUP_ETP, 1, {1, 0, 0, 0}},      {LT_GROUP_EDP, 1, {0, 0, 1, 0}},
    {LT_GROUP_TP_EP, 1, {1, 1, 0, 0}}, {LT_GROUP_TP_EP_PP, 1, {1, 1, 0, 1}},
};
#define NBRUTE ((int)(sizeof brute_kinds / sizeof brute_kinds[0]))

/* The ranks whose `coord` agree with rank r's outside `vary` (ascending by construction). */
static int brute_group(int world, int coord[][4], const int *vary, int r, int *out) {
    int n = 0;
    for (int s = 0; s < world; s++) {
        int same = 1;
        for (int a = 0; a < 4; a++)
            if (!vary[a] && coord[s][a] != coord[r][a])
                same = 0;
        if (same)
            out[n++] = s;
    }
    return n;
}

/* dp_last: Megatron's use_tp_pp_dp_mapping, order tp-cp-ep-pp-dp. */
static void check_order(int world, int tp, int pp, int cp, int ep, int etp, int dp_last) {
    char L[128];
    snprintf(L, sizeof L, "world %d TP%d PP%d CP%d EP%d ETP%d%s", world, tp, pp, cp, ep, etp,
             dp_last ? " tp-cp-ep-pp-dp" : "");
    lt_grid_config cfg = {world, tp, pp, cp, ep, etp, 0, dp_last};
    lt_grid g;
    char err[256];
    int rc = lt_grid_init(&g, &cfg, err, sizeof err);
    TAP_CHECK(rc == 0, "%s: valid layout (%s)", L, rc ? err : "ok");
    if (rc)
        return;
    int E = etp ? etp : tp, dp = world / (tp * pp * cp), edp = world / (E * ep * pp);
    TAP_CHECK(g.dp == dp && g.edp == edp && g.etp == E, "%s: DP %d, expert DP %d", L, dp, edp);

    /* Coordinates by enumeration; each formula must hit every rank once. */
    static int dense[MAXW][4], expert[MAXW][4];
    int hits[MAXW] = {0}, ehits[MAXW] = {0}, bijective = 1;
    for (int p = 0; p < pp; p++)
        for (int d = 0; d < dp; d++)
            for (int c = 0; c < cp; c++)
                for (int t = 0; t < tp; t++) {
                    int r = dp_last ? t + tp * (c + cp * (p + pp * d)) : t + tp * (c + cp * (d + dp * p));
                    hits[r]++;
                    dense[r][0] = t, dense[r][1] = c, dense[r][2] = d, dense[r][3] = p;
                    if (lt_grid_rank(&g, t, c, d, p) != r)
                        bijective = 0;
                }
    for (int p = 0; p < pp; p++)
        for (int d = 0; d < edp; d++)
            for (int e = 0; e < ep; e++)
                for (int t = 0; t < E; t++) {
                    int r = dp_last ? t + E * (e + ep * (p + pp * d)) : t + E * (e + ep * (d + edp * p));
                    ehits[r]++;
                    expert[r][0] = t, expert[r][1] = e, expert[r][2] = d, expert[r][3] = p;
                    if (lt_grid_expert_rank(&g, t, e, d, p) != r)
                        bijective = 0;
                }
    for (int r = 0; r < world; r++)
        if (hits[r] != 1 || ehits[r] != 1)
            bijective = 0;
    TAP_CHECK(bijective, "%s: lt_grid_rank and lt_grid_expert_rank are the formulas, one rank per coordinate", L);

    int coords_ok = 1;
    for (int r = 0; r < world; r++) {
        lt_rank_coords c;
        if (lt_grid_coords(&g, r, &c) != 0 || c.rank != r || c.tp_rank != dense[r][0] || c.cp_rank != dense[r][1] ||
            c.dp_rank != dense[r][2] || c.pp_rank != dense[r][3] || c.etp_rank != expert[r][0] ||
            c.ep_rank != expert[r][1] || c.edp_rank != expert[r][2] || c.pp_rank != expert[r][3] ||
            lt_grid_rank(&g, c.tp_rank, c.cp_rank, c.dp_rank, c.pp_rank) != r ||
            lt_grid_expert_rank(&g, c.etp_rank, c.ep_rank, c.edp_rank, c.pp_rank) != r || c.tp_size != tp ||
            c.cp_size != cp || c.dp_size != dp || c.pp_size != pp || c.etp_size != E || c.ep_size != ep ||
            c.edp_size != edp)
            coords_ok = 0, printf("#   coords of rank %d differ\n", r);
    }
    TAP_CHECK(coords_ok, "%s: coordinates match the brute force and round-trip rank -> coords -> rank", L);

    for (int k = 0; k < NBRUTE; k++) {
        lt_group_kind kind = brute_kinds[k].kind;
        const int *vary = brute_kinds[k].vary;
        int(*coord)[4] = brute_kinds[k].expert ? expert : dense;
        int ok = 1, seen[MAXW] = {0}, prev_first = -1;
        int expect_size = brute_group(world, coord, vary, 0, (int[MAXW]){0});
        int num = lt_grid_num_groups(&g, kind);
        if (lt_grid_group_size(&g, kind) != expect_size || num * expect_size != world)
            ok = 0;
        /* Enumeration: each group is a brute-force group, each rank in exactly one, ascending by first member. */
        for (int i = 0; ok && i < num; i++) {
            int ranks[MAXW], want[MAXW], n;
            if (lt_grid_group_at(&g, kind, i, ranks, &n) != 0 || n != expect_size) {
                ok = 0;
                break;
            }
            int m = brute_group(world, coord, vary, ranks[0], want);
            if (m != n || memcmp(ranks, want, n * sizeof(int)) != 0 || ranks[0] <= prev_first)
                ok = 0;
            prev_first = ranks[0];
            for (int j = 0; j < n; j++)
                seen[ranks[j]]++;
        }
        for (int r = 0; ok && r < world; r++) {
            int ranks[MAXW], want[MAXW], n, at[MAXW], na;
            int idx = lt_grid_group(&g, kind, r, ranks, &n);
            int m = brute_group(world, coord, vary, r, want);
            if (seen[r] != 1 || idx < 0 || m != n || memcmp(ranks, want, n * sizeof(int)) != 0)
                ok = 0;
            else if (lt_grid_group_at(&g, kind, idx, at, &na) != 0 || na != n || memcmp(at, ranks, n * sizeof(int)))
                ok = 0;
        }
        TAP_CHECK(ok, "%s: %s groups (size %d) match the brute force; every rank in exactly one", L,
                  lt_group_kind_name(kind), expect_size);
        if (!ok)
            print_groups(&g, kind);
    }

    /* The expert grid's PP groups (vary pp on expert coordinates) are the dense PP groups. */
    int pp_same = 1;
    for (int r = 0; r < world; r++) {
        int a[MAXW], b[MAXW];
        int na = brute_group(world, dense, (int[4]){0, 0, 0, 1}, r, a);
        int nb = brute_group(world, expert, (int[4]){0, 0, 0, 1}, r, b);
        if (na != nb || memcmp(a, b, na * sizeof(int)) != 0)
            pp_same = 0;
    }
    TAP_CHECK(pp_same, "%s: dense and expert PP groups are the same", L);

    /* Embedding: first and last stage of each PP group; middle stages belong to none. */
    int emb_ok = lt_grid_num_groups(&g, LT_GROUP_EMBEDDING) == world / pp &&
                 lt_grid_num_groups(&g, LT_GROUP_POSITION_EMBEDDING) == world / pp &&
                 lt_grid_group_size(&g, LT_GROUP_EMBEDDING) == (pp > 1 ? 2 : 1);
    for (int r = 0; r < world; r++) {
        int ppg[MAXW], emb[MAXW], pos[MAXW], n, ne, np;
        n = brute_group(world, dense, (int[4]){0, 0, 0, 1}, r, ppg);
        int ie = lt_grid_group(&g, LT_GROUP_EMBEDDING, r, emb, &ne);
        int ip = lt_grid_group(&g, LT_GROUP_POSITION_EMBEDDING, r, pos, &np);
        int first = dense[r][3] == 0, last = dense[r][3] == pp - 1;
        if (first || last) {
            int at[2], na;
            if (ie < 0 || ne != (pp > 1 ? 2 : 1) || emb[0] != ppg[0] || emb[ne - 1] != ppg[n - 1])
                emb_ok = 0;
            else if (lt_grid_group_at(&g, LT_GROUP_EMBEDDING, ie, at, &na) != 0 || na != ne || at[0] != emb[0])
                emb_ok = 0;
        } else if (ie != -1 || ne != 0) {
            emb_ok = 0;
        }
        if (first ? (ip < 0 || np != 1 || pos[0] != r) : (ip != -1 || np != 0))
            emb_ok = 0;
    }
    TAP_CHECK(emb_ok, "%s: embedding groups are the first and last rank of each PP group", L);
}

static void expect_error(lt_grid_config cfg, const char *expected) {
    lt_grid g;
    char err[512] = "unchanged";
    int rc = lt_grid_init(&g, &cfg, err, sizeof err);
    TAP_CHECK(rc == -1 && strcmp(err, expected) == 0, "error: %s", expected);
    if (rc != -1 || strcmp(err, expected) != 0)
        printf("#   got rc %d: %s\n", rc, err);
    TAP_CHECK(lt_grid_init(&g, &cfg, NULL, 0) == -1, "error without a message buffer: rc -1");
}

static void errors(void) {
    expect_error((lt_grid_config){6, 4, 1, 1, 1, 0, 0},
                 "world_size (6) is not divisible by tensor_model_parallel_size (4) x pipeline_model_parallel_size (1) "
                 "x context_parallel_size (1) = 4");
    expect_error(
        (lt_grid_config){16, 2, 2, 3, 1, 0, 0},
        "world_size (16) is not divisible by tensor_model_parallel_size (2) x pipeline_model_parallel_size (2) "
        "x context_parallel_size (3) = 12");
    expect_error((lt_grid_config){4, 2, 4, 1, 1, 0, 0},
                 "world_size (4) is not divisible by tensor_model_parallel_size (2) x pipeline_model_parallel_size (4) "
                 "x context_parallel_size (1) = 8");
    expect_error((lt_grid_config){8, 1, 1, 1, 4, 4, 0},
                 "world_size (8) is not divisible by expert_tensor_parallel_size (4) x expert_model_parallel_size (4) "
                 "x pipeline_model_parallel_size (1) = 16");
    expect_error((lt_grid_config){8, 4, 1, 1, 4, 0, 0},
                 "world_size (8) is not divisible by expert_tensor_parallel_size (4, from tensor_model_parallel_size) "
                 "x expert_model_parallel_size (4) x pipeline_model_parallel_size (1) = 16");
    expect_error((lt_grid_config){12, 2, 2, 1, 2, 0, 0},
                 "world_size (12) is not divisible by expert_tensor_parallel_size (2, from tensor_model_parallel_size) "
                 "x expert_model_parallel_size (2) x pipeline_model_parallel_size (2) = 8");
    expect_error((lt_grid_config){8, 2, 1, 1, 1, 0, 2},
                 "virtual_pipeline_model_parallel_size (2) needs pipeline_model_parallel_size > 1 (got 1): the "
                 "interleaved schedule runs only with pipeline parallelism");
    expect_error((lt_grid_config){0, 1, 1, 1, 1, 0, 0}, "world_size must be >= 1 (got 0)");
    expect_error((lt_grid_config){8, 0, 1, 1, 1, 0, 0}, "tensor_model_parallel_size must be >= 1 (got 0)");
    expect_error((lt_grid_config){8, 1, 1, -2, 1, 0, 0}, "context_parallel_size must be >= 1 (got -2)");
    expect_error((lt_grid_config){8, 1, 1, 1, 0, 0, 0}, "expert_model_parallel_size must be >= 1 (got 0)");
    expect_error((lt_grid_config){8, 1, 1, 1, 1, -1, 0}, "expert_tensor_parallel_size must be >= 0 (got -1)");
    /* The dense check comes first, as in Megatron. */
    expect_error((lt_grid_config){6, 4, 1, 1, 4, 0, 0},
                 "world_size (6) is not divisible by tensor_model_parallel_size (4) x pipeline_model_parallel_size (1) "
                 "x context_parallel_size (1) = 4");

    lt_grid g = make(16, 2, 4, 1, 1, 0, 2);
    TAP_CHECK(g.vpp == 2 && g.pp == 4 && g.dp == 2, "VPP 2 with PP 4 is valid and kept");
}

static void misc(void) {
    int names_ok = 1;
    for (int k = 0; k < LT_GROUP_COUNT; k++)
        if (!lt_group_kind_name((lt_group_kind)k) || lt_group_kind_parse(lt_group_kind_name((lt_group_kind)k)) != k)
            names_ok = 0;
    TAP_CHECK(names_ok, "every kind has a name that parses back");
    TAP_CHECK(lt_group_kind_parse("dp-cp") == LT_GROUP_DP_CP && lt_group_kind_parse("tp-pp") == LT_GROUP_TP_PP &&
                  lt_group_kind_parse("edp") == LT_GROUP_EDP && lt_group_kind_parse("embedding") == LT_GROUP_EMBEDDING,
              "names: dp-cp, tp-pp, edp, embedding");
    TAP_CHECK(lt_group_kind_parse("cp-dp") == -1 && lt_group_kind_parse(NULL) == -1 &&
                  lt_group_kind_name(LT_GROUP_COUNT) == NULL && lt_group_kind_name((lt_group_kind)-1) == NULL,
              "unknown names and kinds are rejected");

    lt_grid g = make(8, 2, 2, 1, 1, 0, 0);
    int ranks[MAXW], n = 99;
    lt_rank_coords c;
    TAP_CHECK(lt_grid_group(&g, LT_GROUP_TP, 8, ranks, &n) == -1 && n == 0 &&
                  lt_grid_group(&g, LT_GROUP_TP, -1, ranks, &n) == -1 &&
                  lt_grid_group(&g, LT_GROUP_COUNT, 0, ranks, &n) == -1,
              "lt_grid_group rejects ranks out of range and invalid kinds");
    TAP_CHECK(lt_grid_group_at(&g, LT_GROUP_TP, 4, ranks, &n) == -1 && n == 0 &&
                  lt_grid_group_at(&g, LT_GROUP_TP, -1, ranks, &n) == -1 && lt_grid_num_groups(&g, LT_GROUP_TP) == 4,
              "lt_grid_group_at rejects indices out of range");
    TAP_CHECK(lt_grid_coords(&g, 8, &c) == -1 && lt_grid_coords(&g, -1, &c) == -1 &&
                  lt_grid_rank(&g, 2, 0, 0, 0) == -1 && lt_grid_expert_rank(&g, 0, 1, 0, 0) == -1,
              "coordinates out of range are rejected");

    /* PP 4: the middle stages are in no embedding group. */
    g = make(8, 1, 4, 1, 1, 0, 0);
    expect_groups("world 8 PP4", &g, LT_GROUP_PP, "[0,2,4,6] [1,3,5,7]");
    expect_groups("world 8 PP4", &g, LT_GROUP_EMBEDDING, "[0,6] [1,7]");
    expect_groups("world 8 PP4", &g, LT_GROUP_POSITION_EMBEDDING, "[0] [1]");
    TAP_CHECK(lt_grid_group(&g, LT_GROUP_EMBEDDING, 3, ranks, &n) == -1 && n == 0 &&
                  lt_grid_group(&g, LT_GROUP_EMBEDDING, 7, ranks, &n) == 1 && n == 2 && ranks[0] == 1 &&
                  ranks[1] == 7 && lt_grid_group(&g, LT_GROUP_POSITION_EMBEDDING, 6, ranks, &n) == -1,
              "world 8 PP4: rank 3 has no embedding group; rank 7's is [1,7]; rank 6 has no position-embedding group");

    /* World 8, CP2 EP2: the EP groups are exactly the CP groups. */
    g = make(8, 1, 1, 2, 2, 0, 0);
    expect_groups("world 8 CP2 EP2", &g, LT_GROUP_CP, "[0,1] [2,3] [4,5] [6,7]");
    expect_groups("world 8 CP2 EP2", &g, LT_GROUP_EP, "[0,1] [2,3] [4,5] [6,7]");
    expect_groups("world 8 CP2 EP2", &g, LT_GROUP_EDP, "[0,2,4,6] [1,3,5,7]");
    expect_groups("world 8 CP2 EP2", &g, LT_GROUP_DP, "[0,2,4,6] [1,3,5,7]");
}

static void check_layout(int world, int tp, int pp, int cp, int ep, int etp) {
    check_order(world, tp, pp, cp, ep, etp, 0);
}

/* use_tp_pp_dp_mapping: the groups of Megatron's order tp-cp-ep-pp-dp, and its refusal of unequal
 * dense and expert DP sizes under pipelining. */
static void dp_last(void) {
    lt_grid g = {0};
    lt_grid_config cfg = {8, 2, 2, 1, 1, 0, 0, 1};
    char err[256];
    TAP_CHECK(lt_grid_init(&g, &cfg, err, sizeof err) == 0, "tp-cp-ep-pp-dp: world 8 TP2 PP2 is valid");
    int ranks[MAXW], n, ok = 1;
    const int pp_groups[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}}, dp_groups[4][2] = {{0, 4}, {1, 5}, {2, 6}, {3, 7}};
    for (int i = 0; i < 4; i++) {
        lt_grid_group_at(&g, LT_GROUP_PP, i, ranks, &n);
        ok &= n == 2 && ranks[0] == pp_groups[i][0] && ranks[1] == pp_groups[i][1];
        lt_grid_group_at(&g, LT_GROUP_DP, i, ranks, &n);
        ok &= n == 2 && ranks[0] == dp_groups[i][0] && ranks[1] == dp_groups[i][1];
        lt_grid_group_at(&g, LT_GROUP_EMBEDDING, i, ranks, &n);
        ok &= n == 2 && ranks[0] == pp_groups[i][0] && ranks[1] == pp_groups[i][1];
    }
    TAP_CHECK(ok, "tp-cp-ep-pp-dp: world 8 TP2 PP2: PP [0,2] [1,3] [4,6] [5,7], DP [0,4] [1,5] [2,6] [3,7]");
    lt_grid_config unequal = {8, 1, 2, 1, 2, 0, 0, 1}; /* DP 4, expert DP 2 */
    int rc = lt_grid_init(&g, &unequal, err, sizeof err);
    TAP_CHECK(rc != 0 && strstr(err, "When not using pp-last rank ordering, the data parallel size of the attention "
                                     "and moe layers must be the same") && strstr(err, "size 4 but expert data parallel size 2"),
              "tp-cp-ep-pp-dp refuses unequal dense and expert DP under PP: %s", err);
    check_order(16, 2, 2, 2, 2, 0, 1); /* CP2 with EP2: DP 2, expert DP 2 */
    check_order(8, 2, 2, 1, 1, 0, 1);
    check_order(12, 3, 2, 1, 1, 0, 1);
    check_order(16, 2, 2, 1, 2, 1, 1); /* DP 4, expert DP 4 */
    check_order(8, 1, 4, 1, 1, 0, 1);
    check_order(8, 2, 1, 1, 4, 1, 1);  /* PP 1: DP 4, expert DP 2 allowed */
}

int main(void) {
    example_a();
    example_b();
    /* world, tp, pp, cp, ep, etp (0 = tp) */
    check_layout(16, 2, 2, 2, 1, 0); /* Example A */
    check_layout(8, 2, 1, 1, 4, 2);  /* Example B */
    check_layout(8, 2, 1, 1, 4, 1);
    check_layout(16, 2, 2, 1, 4, 1);
    check_layout(8, 2, 2, 1, 1, 0);  /* DP 2 */
    check_layout(12, 3, 2, 1, 1, 0); /* DP 2 */
    check_layout(8, 1, 1, 2, 2, 0);  /* CP and EP together */
    check_layout(1, 1, 1, 1, 1, 0);
    check_layout(8, 8, 1, 1, 1, 0);
    check_layout(8, 1, 8, 1, 1, 0);
    check_layout(24, 2, 2, 3, 3, 2); /* DP 2, expert DP 2 */
    check_layout(32, 2, 2, 2, 4, 1); /* DP 4, expert DP 4 */
    check_layout(48, 2, 3, 2, 2, 4); /* DP 4, ETP > TP: expert DP 2 */
    check_layout(64, 4, 2, 2, 8, 1); /* DP 4, expert DP 4 */
    check_layout(36, 3, 2, 1, 3, 2); /* DP 6, ETP not a multiple of TP: expert DP 3 */
    dp_last();
    errors();
    misc();
    return tap_done();
}
