"""Operations in one training step of each variant, and where they come from.

    python benchmarks/step_ops.py [--backend tensorflow|jax|torch] [--json PATH]
        [--variants a,d,e,kd_only,d_unchecked,e_unchecked] [--views pix,...]

The fixed cost of a step, counted rather than timed (counts do not depend on
the machine's load): on PyTorch the aten operations one eager step dispatches,
each attributed to the innermost `keras_gramkd` function it came from (the
Distiller's checks, its metrics, each term) or to the backward pass and the
optimizer; on TensorFlow the operations of the traced step's graph; on JAX the
equations of the step's jaxpr (nested jaxprs included), which XLA then fuses.
The demo case of step_time.py (its teacher and student) is used, one batch.
"""

import argparse
import collections
import os
import traceback

VARIANTS = ("a", "d", "e", "kd_only", "d_unchecked", "e_unchecked")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        default=os.environ.get("KERAS_BACKEND", "tensorflow"),
    )
    parser.add_argument("--json", help="output file (default runs/benchmarks/)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--views", help="comma-separated demo views (default all)")
    return parser.parse_args(argv)


def _piece(stack):
    """Where an operation comes from: backward, optimizer, or a function."""
    names = [frame.name for frame in stack]
    if "backward" in names:
        return "backward"
    # Not any frame named "apply": torch.autograd.Function.apply runs the
    # forward of every ops.custom_gradient function.
    if "apply_gradients" in names or any("optimizers" in f.filename for f in stack):
        return "optimizer"
    ours = [
        f
        for f in stack
        if "keras_gramkd" in f.filename and not f.filename.endswith("harness.py")
    ]
    if not ours:
        return "keras (outside keras_gramkd)"
    inner = ours[-1]
    return f"{os.path.basename(inner.filename)}:{inner.name}"


def torch_ops(run):
    """{piece: aten operations} of one eager step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[_piece(traceback.extract_stack(limit=80))] += 1
            return func(*args, **(kwargs or {}))

    train_step = run.model.train_step

    def counted_step(*args, **kwargs):
        with Count():
            return train_step(*args, **kwargs)

    run.model.train_step = counted_step
    _one_step(run)
    run.model.train_step = train_step
    return dict(counts.most_common())


def tensorflow_ops(run):
    """{"graph": operations} of the traced step."""
    _one_step(run)
    return {"graph": run.probe.ops}


def jax_ops(run):
    """{"jaxpr": equations} of the step, nested jaxprs included."""
    import jax

    model = run.model
    state = tuple(
        [v.value for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    n = run.batch_size
    x = {k: v[:n] for k, v in run.x.items()} if isinstance(run.x, dict) else run.x[:n]
    jaxpr = jax.make_jaxpr(model.train_step)(state, (x, run.y[:n]))
    return {"jaxpr": _equations(jaxpr.jaxpr)}


def _equations(jaxpr):
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    count += _equations(getattr(inner, "jaxpr", inner))
    return count


def _one_step(run):
    run.model.fit(
        run.x, run.y, batch_size=run.batch_size, epochs=1, steps_per_epoch=1, verbose=0
    )


def main(argv=None):
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    import harness

    views = args.views.split(",") if args.views else None
    case = harness.demo_case(2, views=views)
    counter = {"torch": torch_ops, "tensorflow": tensorflow_ops, "jax": jax_ops}
    result = {"benchmark": "step_ops", "machine": harness.machine_info()}
    result["variants"] = {}
    for name in args.variants.split(","):
        run = harness.build_variant(
            case, name, False if args.backend == "torch" else "auto"
        )
        if run.x is None:
            continue
        _one_step(run)  # builds, traces, warms up
        pieces = counter[args.backend](run)
        result["variants"][name] = {"total": sum(pieces.values()), "pieces": pieces}
        print(f"{name}: {sum(pieces.values())} operations per step")
        for piece, count in pieces.items():
            print(f"    {count:6d}  {piece}")
    path = args.json or harness.default_json("step_ops")
    harness.write_json(path, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
