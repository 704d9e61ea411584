"""`run_study`: the demo's teacher, its methods through `compare_methods`, files.

The demo is a client of `keras_gramkd.study.compare_methods`: it trains the
reference teacher (`keras_gramkd.zoo`) on one setting
(`keras_gramkd.demo.settings`), runs the methods of
`keras_gramkd.demo.methods` over paired seeds, and writes ``results.json``,
``results.md``, ``gram.png``, ``curves.png``, ``paired.png`` and the best
``student.keras`` (and, with ``export=True``, the TFLite and ONNX files).
"""

import datetime
import json
import os
import tempfile
import time

import keras

# The defaults live with the command line, which prints them without keras.
from gramkd.options import DEMO_DEFAULTS as DEFAULTS
from gramkd.options import FULL, GRAM_NORMALIZE_CHOICES, QUICK
from keras_gramkd import zoo
from keras_gramkd.checks import check_number
from keras_gramkd.console import make_console
from keras_gramkd.datasets.mfeat import check_views
from keras_gramkd.demo import report
from keras_gramkd.demo.methods import (
    DEFAULT_METHODS,
    QUICK_METHODS,
    demo_methods,
    main_gram,
    method_cost,
)
from keras_gramkd.demo.settings import (
    DEFAULT_SETTING,
    TEST_NOISE_SEED,
    add_fixed_noise,
    check_setting,
    load_setting,
    setting_fusion,
)
from keras_gramkd.study import SeededBatches, compare_methods, modality_grams

TEACHER_SEED = 0

# The expected wall time (`expected_seconds`) of `gramkd demo` on 2 CPU cores,
# TensorFlow, six views. Measured as the process's CPU seconds (user + system,
# Python's `time.process_time`) of each piece, interleaving each method's
# 30-epoch run with kd runs; the shared machine's load average was 4-9, so wall
# times were 1.5-2.5 times these. On 2 idle cores a run takes at most about
# its CPU time (it waits on nothing but the CPU), so the estimate errs long.
# STARTUP_S: imports (4.7 s), data, figures, files; TEACHER_EPOCH_S: one
# teacher epoch (30 in 12.0 s, tracing included); KD_RUN_S: one student run's
# fixed part (building, compiling, tracing about 4.8 s, scoring about 3 s);
# KD_EPOCH_S: one more kd epoch (8 steps; 29 in 4.06 s). Other methods' epochs
# cost `method_cost(name)` kd epochs.
STARTUP_S = 10.0
TEACHER_EPOCH_S = 0.40
KD_RUN_S = 8.0
KD_EPOCH_S = 0.14


def _flag(key):
    return f"--{key.replace('_', '-')}"


def resolve_config(views, setting, quick=False, methods=None, full=False, **options):
    """The run's settings: `DEFAULTS` (`QUICK` when quick, `FULL` when full)
    overridden by the options that are not None; raises ValueError naming the
    bad option.

    The methods: `methods` if given, else every method (`full`), the quick
    ones (`quick`) or `DEFAULT_METHODS`, each as far as the setting has it.
    """
    if quick and full:
        raise ValueError("--quick and --full exclude each other; give one.")
    cfg = {**DEFAULTS, **(QUICK if quick else FULL if full else {})}
    cfg.update({k: v for k, v in options.items() if v is not None})
    cfg["views"] = list(check_views(views))
    cfg["setting"] = check_setting(setting)
    cfg["quick"], cfg["full"] = bool(quick), bool(full)
    for key in ("epochs", "teacher_epochs", "seeds"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{_flag(key)} must be >= 1; got {cfg[key]}.")
        cfg[key] = int(cfg[key])
    for key in ("gram_weight", "kd_weight", "temperature"):
        strict = key == "temperature"
        cfg[key] = check_number(_flag(key), float(cfg[key]), 0, strict=strict)
    if cfg["gram_normalize"] not in GRAM_NORMALIZE_CHOICES:
        raise ValueError(
            f"Unknown --gram-normalize {cfg['gram_normalize']!r}; choose one of "
            f"{GRAM_NORMALIZE_CHOICES}."
        )
    available, _ = demo_methods(cfg, cfg["views"], setting_fusion(cfg["setting"]))
    if methods is None:
        chosen = None if full else QUICK_METHODS if quick else DEFAULT_METHODS
        methods = [m for m in available if chosen is None or m in chosen]
    methods = [m for item in methods for m in item.split(",") if m]
    unknown = [m for m in methods if m not in available]
    if unknown or "kd" not in methods or len(set(methods)) != len(methods):
        raise ValueError(
            f"Bad --methods {methods}: give distinct names that include kd (the "
            f"reference), from {list(available)} (unknown: {unknown})."
        )
    cfg.update(
        methods=methods,
        batch_size=zoo.BATCH_SIZE,
        teacher_learning_rate=zoo.TEACHER_LEARNING_RATE,
        student_learning_rate=zoo.STUDENT_LEARNING_RATE,
    )
    return cfg


def expected_seconds(cfg):
    """The expected wall time of a run of `cfg` on 2 idle CPU cores.

    ``STARTUP_S + TEACHER_EPOCH_S·teacher_epochs + seeds·Σ_methods (KD_RUN_S
    + KD_EPOCH_S·method_cost(method)·epochs)``.
    """
    per_seed = sum(
        KD_RUN_S + KD_EPOCH_S * method_cost(m) * cfg["epochs"] for m in cfg["methods"]
    )
    return STARTUP_S + TEACHER_EPOCH_S * cfg["teacher_epochs"] + cfg["seeds"] * per_seed


def expected_line(cfg):
    """The line the demo prints at its start: the expected time and the work.

    >>> cfg = {"teacher_epochs": 30, "epochs": 30, "seeds": 3,
    ...        "methods": ["labels", "kd", "gram", "gram_batch_mean"]}
    >>> expected_line(cfg).split(" (")[1]
    'teacher 30 epochs, 4 methods × 3 seeds × 30 epochs)'
    """
    seconds = expected_seconds(cfg)
    about = (
        f"{max(10, round(seconds, -1)):.0f} s"
        if seconds < 90
        else f"{seconds / 60:.0f} min"
    )
    n = len(cfg["methods"])
    return (
        f"Expected: about {about} on 2 idle CPU cores (teacher "
        f"{cfg['teacher_epochs']} epochs, {n} method{'s' * (n != 1)} × "
        f"{cfg['seeds']} seed{'s' * (cfg['seeds'] != 1)} × {cfg['epochs']} epochs)"
    )


def _model_size(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def _train_teacher(data, dims, epochs, progress):
    keras.utils.set_random_seed(TEACHER_SEED)
    teacher = zoo.build_teacher(dims)
    zoo.compile_for_training(teacher, zoo.TEACHER_LEARNING_RATE)
    x, y = data.teacher_train
    start = time.perf_counter()
    teacher.fit(
        SeededBatches(x, y, zoo.BATCH_SIZE, seed=TEACHER_SEED),
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[progress.epoch_callback("teacher")],
    )
    seconds = time.perf_counter() - start
    teacher.trainable = False
    return teacher, seconds


def _compare(teacher, data, cfg, methods, progress):
    """`compare_methods` on the setting's students, paired against kd."""
    views = cfg["views"]
    x_train = data.teacher_train[0]
    steps = -(-len(next(iter(x_train.values()))) // zoo.BATCH_SIZE)
    dims = {v: x_train[v].shape[1] for v in views}
    return compare_methods(
        teacher,
        lambda: data.build_student(dims),
        data.student_train,
        data.student_test,
        methods,
        seeds=cfg["seeds"],
        reference="kd",
        epochs=cfg["epochs"],
        batch_size=zoo.BATCH_SIZE,
        steps_per_epoch=steps,
        optimizer=lambda: keras.optimizers.Adam(zoo.STUDENT_LEARNING_RATE),
        loss=data.task_loss,
        validation=data.student_test,
        modalities=list(views),
        teacher_modalities=zoo.view_addresses("t", views),
        student_modalities=zoo.view_addresses("s", views),
        gram_normalize=cfg["gram_normalize"],
        teacher_test=data.teacher_test,
        distiller_kwargs=data.distiller_kwargs,
        on_run_end=progress.run_done,
        keep_students=True,
    )


def _model_summaries(teacher, teacher_time, student, data):
    return {
        "teacher": {
            "params": int(teacher.count_params()),
            "size_bytes": _model_size(teacher),
            "train_time_s": teacher_time,
        },
        "student": {
            "params": int(student.count_params()),
            "size_bytes": _model_size(student),
            "fusion": data.fusion,
        },
    }


def _write_figures(out, teacher, result, data, cfg):
    """gram.png (the main Gram method, else kd), curves.png, paired.png;
    returns the method shown in gram.png."""
    method = main_gram(data.fusion)
    method = method if method in result.methods else "kd"
    _plot_grams(out, teacher, result, data, cfg, method)
    report.plot_curves(out, result)
    result.plot(os.path.join(out, "paired.png"), setting=data.setting)
    return method


def _plot_grams(out, teacher, result, data, cfg, method):
    """gram.png for `method`'s best seed."""
    views, normalize = cfg["views"], cfg["gram_normalize"]
    seed = report.best_run(result, "accuracy", only=method)[1]
    report.plot_grams(
        out,
        modality_grams(
            teacher, zoo.view_addresses("t", views), data.teacher_test[0], normalize
        ),
        modality_grams(
            result.students[(method, seed)],
            zoo.view_addresses("s", views),
            data.student_test[0],
            normalize,
        ),
        data.student_test[1],
        views,
        normalize,
        f"{method}, seed {seed}",
    )


def _export(student, data, out):
    """The best student as TFLite and ONNX files, each verified."""
    from keras_gramkd.export import export_student

    # int8 calibration must see inputs like the deployed student's: noisy
    # ones in the noisy setting (clean ones give too narrow ranges).
    calibration = data.student_train[0]
    if data.student_noise:
        calibration = add_fixed_noise(calibration, TEST_NOISE_SEED + 2)
    return export_student(
        student,
        os.path.join(out, "export"),
        formats=("tflite", "onnx"),
        quantize=(None, "float16", "dynamic", "int8"),
        representative_data=calibration,
        sample_data=data.student_test[0],
        check=False,
    )


def run_study(
    views=None,
    setting=DEFAULT_SETTING,
    epochs=None,
    teacher_epochs=None,
    seeds=None,
    gram_weight=None,
    kd_weight=None,
    temperature=None,
    gram_normalize=None,
    methods=None,
    quick=False,
    full=False,
    out=None,
    train_per_class=None,
    verbose=True,
    console=None,
    export=False,
):
    """Runs the study and writes its files; returns the results dict.

    Args:
        views: view names (default all six of `MFEAT_VIEWS`).
        setting: one of `SETTINGS` (default `DEFAULT_SETTING`).
        epochs, teacher_epochs: student and teacher epochs (one epoch = one pass
            over the full training split).
        seeds: number of student seeds (0, 1, ...), paired across methods.
        gram_weight, kd_weight, temperature, gram_normalize: the loss settings.
        methods: names from `keras_gramkd.demo.methods` (default
            `DEFAULT_METHODS`; with `full`, all; with `quick`, labels, kd and
            the Grams); must include ``kd``.
        quick: a smoke run: one seed, 5 epochs, the quick methods.
        full: every method at `FULL` (3 seeds, 30 epochs); explicit
            `methods`, `seeds` and `epochs` still override.
        out: output directory (default ``runs/demo-<timestamp>/``).
        train_per_class: optional cap on training samples per class.
        verbose: print progress and the tables.
        console: optional `rich.console.Console`.
        export: also export the best student to TFLite and ONNX (float32,
            float16, dynamic, int8) under ``out/export/``, verify each file in
            its runtime, and add the export table to the results (needs the
            `export` extra).

    Returns:
        The dict written to ``results.json``.
    """
    cfg = resolve_config(
        views,
        setting,
        quick=quick,
        methods=methods,
        full=full,
        epochs=epochs,
        teacher_epochs=teacher_epochs,
        seeds=seeds,
        gram_weight=gram_weight,
        kd_weight=kd_weight,
        temperature=temperature,
        gram_normalize=gram_normalize,
    )
    views = tuple(cfg["views"])
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("runs", f"demo-{stamp}")
    os.makedirs(out, exist_ok=True)
    console = console or make_console(quiet=not verbose)
    wall_start = time.perf_counter()
    expected = expected_seconds(cfg)
    if verbose:
        console.print(expected_line(cfg), markup=False, highlight=False)

    data = load_setting(cfg["setting"], views, train_per_class)
    dims = {v: data.teacher_train[0][v].shape[1] for v in views}
    all_methods, skipped = demo_methods(cfg, views, data.fusion)
    methods = {m: all_methods[m] for m in cfg["methods"]}
    if not any(m.startswith(f"{main_gram(data.fusion)}_") for m in methods):
        skipped = {}  # no control was asked for
    n_runs = len(methods) * cfg["seeds"]
    with report.Progress(console, verbose, total=n_runs + 2) as progress:
        teacher, teacher_time = _train_teacher(
            data, dims, cfg["teacher_epochs"], progress
        )
        progress.advance("teacher trained")
        result = _compare(teacher, data, cfg, methods, progress)
        best = report.best_run(result, data.headline)
        student = result.students[best]
        student.save(os.path.join(out, "student.keras"))
        gram_method = _write_figures(out, teacher, result, data, cfg)
        progress.advance("files written")

    results = {
        "config": cfg,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "data": report.data_summary(data, views),
        **_model_summaries(teacher, teacher_time, student, data),
        "study": result.to_dict(),
        "headline": data.headline,
        "skipped_controls": skipped,
        "best_student": {
            "method": best[0],
            "seed": best[1],
            "file": "student.keras",
            "note": f"the method with the best mean {data.headline} accuracy, "
            "its best seed",
        },
    }
    results["conclusion"] = report.conclusion(
        result, data, gram_method, kd_weight=cfg["kd_weight"]
    )
    results["wall_time_s"] = time.perf_counter() - wall_start
    results["expected_time_s"] = expected
    markdown = report.markdown(results, result)
    if export:
        exported = _export(student, data, out)
        results["export"] = exported.to_dict()
        markdown += (
            "\n## Export of the best student\n\n" + exported.to_markdown() + "\n"
        )
        if verbose:
            console.print(str(exported))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown)
    if verbose:
        report.print_tables(console, results, result, out)
    return results
