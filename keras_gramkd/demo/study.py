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
from gramkd.options import GRAM_NORMALIZE_CHOICES, QUICK
from keras_gramkd import zoo
from keras_gramkd.checks import check_number
from keras_gramkd.console import make_console
from keras_gramkd.datasets.mfeat import check_views
from keras_gramkd.demo import report
from keras_gramkd.demo.methods import QUICK_METHODS, demo_methods, main_gram
from keras_gramkd.demo.settings import (
    DEFAULT_SETTING,
    TEST_NOISE_SEED,
    UNLABELLED,
    add_fixed_noise,
    check_setting,
    load_setting,
    setting_fusion,
)
from keras_gramkd.study import SeededBatches, compare_methods, modality_grams

TEACHER_SEED = 0


def _flag(key):
    return f"--{key.replace('_', '-')}"


def resolve_config(views, setting, quick=False, methods=None, **options):
    """The run's settings: `DEFAULTS` (`QUICK` when quick) overridden by the
    options that are not None; raises ValueError naming the bad option."""
    cfg = {**DEFAULTS, **(QUICK if quick else {})}
    cfg.update({k: v for k, v in options.items() if v is not None})
    cfg["views"] = list(check_views(views))
    cfg["setting"] = check_setting(setting)
    cfg["quick"] = bool(quick)
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
        methods = [m for m in available if not quick or m in QUICK_METHODS]
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


def _task_loss(data):
    ignore = UNLABELLED if data.has_unlabelled else None
    return lambda: keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore
    )


def _compare(teacher, data, cfg, methods, progress):
    """`compare_methods` on the setting's students, paired against kd."""
    views = cfg["views"]
    x_train = data.teacher_train[0]
    steps = -(-len(next(iter(x_train.values()))) // zoo.BATCH_SIZE)
    dims = {v: x_train[v].shape[1] for v in views}
    return compare_methods(
        teacher,
        lambda: zoo.build_student(
            dims, data.student_noise, data.modality_dropout, fusion=data.fusion
        ),
        data.student_train,
        data.student_test,
        methods,
        seeds=cfg["seeds"],
        reference="kd",
        epochs=cfg["epochs"],
        batch_size=zoo.BATCH_SIZE,
        steps_per_epoch=steps,
        optimizer=lambda: keras.optimizers.Adam(zoo.STUDENT_LEARNING_RATE),
        loss=_task_loss(data),
        modalities=list(views),
        teacher_modalities=zoo.view_addresses("t", views),
        student_modalities=zoo.view_addresses("s", views),
        gram_normalize=cfg["gram_normalize"],
        teacher_test=data.teacher_test,
        distiller_kwargs=(
            {"student_mask_layer": zoo.STUDENT_MASK_LAYER}
            if data.modality_dropout
            else None
        ),
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
    result.plot(os.path.join(out, "paired.png"))
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
        methods: names from `keras_gramkd.demo.methods` (default all; with
            `quick`, labels, kd and the Grams); must include ``kd``.
        quick: a smoke run: one seed, 5 epochs, the quick methods.
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
    results["conclusion"] = report.conclusion(result, data, gram_method)
    results["wall_time_s"] = time.perf_counter() - wall_start
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
