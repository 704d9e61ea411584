"""The cosine Gram loss: `keras_gramkd.ops.gram_matrix` against the textbook form.

    python benchmarks/gram_ops.py [--backend tensorflow|jax|torch] [--quick]
        [--json PATH] [--rounds N] [--jit-compile auto|true|false] [--threads N]

The textbook cosine Gram normalises every row of the (batch, M, d) features
(`l2_normalize_rows`, O(batch·M·d) forward and backward) and then multiplies;
`gram_matrix(x, "l2")` multiplies first and normalises the M×M result by its
diagonal (O(batch·M²)). For each shape, the median time of the loss's value and
gradient (teacher and student features, as in a training step), compiled as the
step is, for both forms, their ratio, and the largest difference of the values.
"""

import statistics

from step_time import common_parser, configure

SHAPES = ((256, 8, 256), (128, 6, 64), (128, 6, 8), (64, 32, 128), (1024, 4, 1024))
QUICK_SHAPES = ((16, 3, 8),)


def textbook_gram_loss(teacher, student):
    """mean((Ĝ_t − Ĝ_s)²) with Ĝ = normalised rows times their transpose."""
    from keras import ops

    from keras_gramkd import ops as kd_ops

    def gram(x):
        x = kd_ops.l2_normalize_rows(x)
        return ops.matmul(x, ops.transpose(x, (0, 2, 1)))

    return kd_ops.gram_distance(ops.stop_gradient(gram(teacher)), gram(student))


def library_gram_loss(teacher, student):
    from keras import ops

    from keras_gramkd import ops as kd_ops

    return kd_ops.gram_distance(
        ops.stop_gradient(kd_ops.gram_matrix(teacher)), kd_ops.gram_matrix(student)
    )


def main(argv=None):
    args = common_parser(__doc__, "one tiny shape").parse_args(argv)
    configure(args)
    import harness
    import numpy as np
    from keras import ops

    jit = args.jit if args.jit != "auto" else True
    rows, points = [], []
    for batch, m, d in QUICK_SHAPES if args.quick else SHAPES:
        rng = np.random.default_rng(0)
        teacher, student = (
            rng.standard_normal((batch, m, d)).astype("float32") for _ in range(2)
        )
        times = {"textbook": [], "library": []}
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            for name, loss in (
                ("textbook", textbook_gram_loss),
                ("library", library_gram_loss),
            ):
                times[name].append(
                    harness.value_and_grad_ms(loss, teacher, student, jit)
                )
        textbook, library = (statistics.median(times[k]) for k in times)
        difference = abs(
            float(ops.convert_to_numpy(textbook_gram_loss(teacher, student)))
            - float(ops.convert_to_numpy(library_gram_loss(teacher, student)))
        )
        point = {
            "batch": batch,
            "M": m,
            "d": d,
            "textbook_ms": textbook,
            "library_ms": library,
            "ratio": library / textbook,
            "value_difference": difference,
            "times_ms": times,
        }
        points.append(point)
        rows.append(
            [
                f"{batch} / {m} / {d}",
                f"{textbook:.3f}",
                f"{library:.3f}",
                f"{point['ratio']:.2f}x",
                f"{difference:.1e}",
            ]
        )
    harness.print_table(
        f"cosine Gram loss, value + gradient ({args.backend}, jit={jit}; "
        f"median of {args.rounds})",
        ["batch / M / d", "textbook ms", "gram_matrix ms", "ratio", "|Δ value|"],
        rows,
        left=1,
    )
    path = args.json or harness.default_json("gram_ops")
    harness.write_json(
        path,
        {
            "benchmark": "gram_ops",
            "machine": harness.machine_info(),
            "settings": {"quick": args.quick, "rounds": args.rounds, "jit": jit},
            "points": points,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
