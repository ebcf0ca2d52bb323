"""nvcc_object: one .cu compiled by nvcc into an object file, for a cc_library's srcs.

A rule rather than a genrule because the engine headers the plugin includes are not exported files of
their packages: it takes them from the CcInfo of the libraries that declare them (header_deps), keeps
only the ones listed in engine_headers (so editing another engine header does not recompile the
plugin), and hands them to the action as inputs. Nothing of those libraries is linked."""

NVCC = "/usr/local/cuda/bin/nvcc"

def _nvcc_object_impl(ctx):
    out = ctx.actions.declare_file(ctx.label.name + ".o")
    wanted = {h: True for h in ctx.attr.engine_headers}
    engine = []
    for dep in ctx.attr.header_deps:
        for h in dep[CcInfo].compilation_context.headers.to_list():
            if h.path in wanted:
                engine.append(h)
    found = {h.path: True for h in engine}
    missing = [h for h in ctx.attr.engine_headers if h not in found]
    if missing:
        fail("engine headers not found in header_deps: %s" % missing)
    ctx.actions.run_shell(
        inputs = [ctx.file.src] + ctx.files.hdrs + engine,
        outputs = [out],
        # nvcc names its temporary files after its process id; sandboxes have their own pid namespaces and
        # share /tmp, so two concurrent nvcc runs can both be pid 2 and collide: each gets its own TMPDIR.
        command = "t=$(mktemp -d) && TMPDIR=$t %s %s -c %s -o %s; rc=$?; rm -rf \"$t\"; exit $rc" % (
            NVCC,
            " ".join(ctx.attr.copts),
            ctx.file.src.path,
            out.path,
        ),
        mnemonic = "Nvcc",
        progress_message = "nvcc %s" % ctx.file.src.short_path,
        use_default_shell_env = True,  # PATH, for nvcc's host compiler
    )
    return [DefaultInfo(files = depset([out]))]

nvcc_object = rule(
    implementation = _nvcc_object_impl,
    attrs = {
        "src": attr.label(allow_single_file = [".cu"]),
        "hdrs": attr.label_list(allow_files = [".cuh", ".h"]),
        "header_deps": attr.label_list(providers = [CcInfo]),
        "engine_headers": attr.string_list(),
        "copts": attr.string_list(),
    },
)
