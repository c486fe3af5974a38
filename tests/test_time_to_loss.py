"""bench/time_to_loss.py's table logic on small synthetic curves (no training)."""
import json
import math

import pytest

from bench import time_to_loss as ttl


def _row(iteration, val_loss=None, ms=10.0):
    return {"iteration": float(iteration), "epoch": iteration / 100, "train_loss": 2.0, "val_loss": val_loss,
            "learning_rate": 2e-3, "grad_param_norm": 0.1, "ms_per_iteration": ms, "chars_per_s": 1.0}


def test_evaluations_carry_the_training_seconds_of_every_iteration_before_them():
    rows = [_row(1), _row(2, 2.5), _row(3), _row(4, 1.9, ms=20.0)]
    assert ttl.evaluations(rows) == [(2, 0.02, 2.5, 0.02), (4, 0.04, 1.9, 0.05)]


def test_a_target_is_reached_at_the_first_evaluation_at_or_below_it():
    evals = [(10, 0.1, 2.0, 1.0), (20, 0.2, 1.55, 2.0), (30, 0.3, 1.45, 3.0), (40, 0.4, 1.40, 4.0)]
    hit = ttl.crossing(evals, 1.50)
    assert (hit["iterations"], hit["epochs"], hit["train_seconds"]) == (30, 0.3, 3.0)
    assert hit["iterations_interpolated"] == pytest.approx(25.0)  # halfway from 1.55 to 1.45
    assert ttl.crossing(evals, 1.45)["iterations"] == 30  # equal counts as reached
    assert ttl.crossing(evals, 1.30) is None


def test_a_curve_that_goes_back_up_keeps_its_first_crossing_and_its_best():
    evals = [(10, 0.1, 1.7, 1.0), (20, 0.2, 1.48, 2.0), (30, 0.3, 1.52, 3.0), (40, 0.4, 1.49, 4.0)]
    summary = ttl.summarize(evals)
    assert summary["targets"]["1.50"]["iterations"] == 20
    assert summary["targets"]["1.45"] is None
    assert (summary["best_val_loss"], summary["best_at_iteration"], summary["last_epoch"]) == (1.48, 20, 0.4)


def test_a_run_stops_at_the_last_target_or_when_it_has_stalled():
    assert ttl.stop_reason([]) is None
    assert ttl.stop_reason([(10, 1.0, 1.6, 1.0), (20, 2.0, 1.45, 2.0)]).startswith("reached")
    assert ttl.stop_reason([(1200, 2.9, 2.5, 1.0)]) is None
    assert ttl.stop_reason([(1260, 3.0, 2.5, 1.0)]).startswith("stalled")
    assert ttl.stop_reason([(1260, 3.0, 1.8, 1.0)]) is None
    assert ttl.stop_reason([(2100, 5.0, 1.8, 1.0)]).startswith("stalled")
    # a large batch, past 3 epochs in fewer than 300 iterations, goes on
    assert ttl.stop_reason([(160, 3.0, 2.5, 1.0)]) is None
    assert ttl.stop_reason([(300, 5.7, 2.5, 1.0)]).startswith("stalled")


def test_a_large_batch_gets_more_epochs_than_a_small_one():
    chars = 1_115_394
    assert ttl.max_epochs(50, chars) == ttl.MAX_EPOCHS
    assert ttl.iterations_per_epoch(1600, chars) * ttl.max_epochs(1600, chars) >= ttl.MIN_UPDATES


def _result(batch, lr, iterations_to_150, epochs_to_150, seed=123, warmup=0, precision="fp32"):
    spec = ttl.Spec(batch, lr, warmup, seed, "test", precision)
    hit = None if iterations_to_150 is None else {"iterations": iterations_to_150, "epochs": epochs_to_150,
                                                  "train_seconds": 0.0,
                                                  "iterations_interpolated": float(iterations_to_150)}
    return spec.run_id, {"batch": batch, "learning_rate": lr, "warmup": warmup, "seed": seed, "recipe": "test",
                         "precision": precision,
                         "run_id": spec.run_id, "best_val_loss": 1.49 if hit else 1.7, "last_epoch": 10.0,
                         "stopped": "test", "targets": {"1.60": hit, "1.50": hit, "1.45": None}}


def _per_row_time(batch, threads, precision="fp32"):
    """1 ms per batch row on one thread; threads take a block of rows each (none idle below B)."""
    return 1e-3 * math.ceil(batch / threads), "modelled"


def test_the_envelope_picks_per_core_count_the_batch_that_gets_there_first():
    results = dict([_result(50, 2e-3, 1000, 2.4), _result(800, 1.6e-2, 70, 3.2),
                    _result(1600, 3.2e-2, None, None), _result(800, 1.6e-2, 10, 0.4, seed=456)])
    rows = ttl.time_rows(results, _per_row_time, cores=(1, 64))
    best = ttl.best_envelope(rows, 1.50)
    # 1 core: 1000 x 50 ms = 50 s against 70 x 800 ms = 56 s; 64 cores: 1000 x 1 ms against 70 x 13 ms
    assert (best[1]["batch_size"], best[1]["seconds_to_1.50"]) == (50, pytest.approx(50.0))
    assert (best[64]["batch_size"], best[64]["seconds_to_1.50"]) == (800, pytest.approx(70 * 0.013))
    assert best[64]["seed"] == 123  # the second seed's lucky run does not choose
    assert ttl.best_envelope(rows, 1.45) == {}  # nobody reached it
    unreached = [r for r in rows if r["batch_size"] == 1600]
    assert unreached and all(r["seconds_to_1.50"] is None for r in unreached)


def test_equal_times_go_to_the_smaller_batch():
    results = dict([_result(100, 4e-3, 200, 1.0), _result(200, 8e-3, 100, 1.0)])
    rows = ttl.time_rows(results, lambda b, p, precision: (1e-3 * b, "measured"), cores=(1,))
    assert ttl.best_envelope(rows, 1.50)[1]["batch_size"] == 100


def test_the_largest_batch_within_ten_percent_of_batch_50s_epochs():
    results = dict([_result(50, 2e-3, 1000, 4.0), _result(50, 4e-3, 800, 3.0),
                    _result(200, 8e-3, 210, 3.3), _result(400, 1.6e-2, 110, 3.4),
                    _result(800, 1.6e-2, None, None), _result(1600, 1e-2, 40, 3.0, seed=456)])
    within = ttl.largest_batch_within(results)
    assert within["batch_50_epochs"] == 3.0
    assert within["largest_batch"] == 200  # 3.3 is 10% over 3.0; 3.4 is not; 800 never got there
    assert within["epochs_by_batch"]["800"] is None


def test_modelled_times_take_the_models_speedup_from_the_measured_one_thread_time():
    speed = {"points": [{"batch_size": 200, "threads": 1, "ranks": 1, "precision": "fp32", "mean_ms": 300.0},
                        {"batch_size": 200, "threads": 2, "ranks": 1, "precision": "fp32", "mean_ms": 160.0},
                        {"batch_size": 200, "threads": 1, "ranks": 2, "precision": "fp32", "mean_ms": 170.0}]}
    t = ttl.iteration_seconds(speed, model=lambda batch, threads: 0.2 / min(threads, 8))
    assert t(200, 2) == (0.16, "measured")  # the 2-thread process's, not the 2 ranks'
    assert t(200, 16) == (pytest.approx(0.3 / 8), "modelled")
    assert t(400, 16) == (pytest.approx(0.2 / 8), "modelled")  # nothing measured at 400: the model's own


def test_the_recipes_file_is_what_the_trainers_start_up_note_reads(tmp_path):
    from phi_rnn import train
    results = dict([_result(50, 2e-3, 1000, 2.4), _result(800, 1.6e-2, 70, 3.2, warmup=25)])
    rows = ttl.time_rows(results, _per_row_time, cores=(1, 64))
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps(ttl.recipes_per_thread_count(rows)))
    assert train.measured_recipe(64, str(path)) == {"batch_size": 800, "lr_scaling": "none", "lr_warmup": 25,
                                                    "learning_rate": 1.6e-2, "precision": "fp32"}
    assert train.measured_recipe(1, str(path))["batch_size"] == 50
    assert train.measured_recipe(16, str(path)) is None  # no row for 16 cores


def test_mpi_ranks_are_timed_at_their_own_measured_points_only():
    speed = {"points": [{"batch_size": 50, "threads": 2, "ranks": 1, "precision": "fp32", "mean_ms": 20.0},
                        {"batch_size": 50, "threads": 1, "ranks": 2, "precision": "fp32", "mean_ms": 22.0}]}
    t = ttl.rank_seconds(speed, 2)
    assert t(50, 2) == (0.022, "measured")
    assert t(100, 2) == (None, "not measured")


def test_an_mpi_run_is_launched_by_the_mpiexec_beside_the_interpreter():
    spec = ttl.Spec(50, 2e-3, 0, 123, "char-rnn")
    one = ttl.train_command(spec, 1_115_394, "cv/x", threads=2)
    two = ttl.train_command(spec, 1_115_394, "cv/x", threads=1, ranks=2)
    assert two[1:3] == ["-n", "2"] and two[0].endswith("mpiexec") and two[3:] != one
    assert one[one.index("--threads") + 1] == "2" and two[two.index("--threads") + 1] == "1"
    assert two[two.index("--policy") + 1] == "compact"  # each rank its own core


def _point(batch, threads, precision, ms):
    return {"batch_size": batch, "threads": threads, "ranks": 1, "precision": precision, "mean_ms": ms}


def test_bfloat16_beyond_the_measured_points_is_float32_times_the_ratio_at_as_many_rows_per_thread():
    speed = {"points": [_point(50, 1, "fp32", 40.0), _point(50, 2, "fp32", 20.0), _point(50, 2, "bf16", 14.0),
                        _point(2, 2, "fp32", 4.0), _point(2, 2, "bf16", 3.6),
                        _point(8, 2, "fp32", 8.0), _point(8, 2, "bf16", 6.0)]}
    t = ttl.iteration_seconds(speed, model=lambda batch, threads: 1.0 / min(threads, batch))
    assert t(50, 2, "bf16") == (0.014, "measured")
    fp32_64, source = t(50, 64)  # 1 row per thread: the ratio measured with 1 row per thread
    assert source == "modelled" and t(50, 64, "bf16") == (pytest.approx(fp32_64 * 0.9), "modelled")
    assert t(50, 16, "bf16")[0] == pytest.approx(t(50, 16)[0] * 0.75)  # 4 rows per thread: nearest 4
    assert t(50, 4, "bf16")[0] == pytest.approx(t(50, 4)[0] * 0.7)  # 13 rows: nearest 25 (batch 50's)


def test_the_plan_runs_bfloat16_after_the_float32_recipes_and_only_where_the_cpu_has_it():
    chars = 1_115_394
    assert all(spec.precision == "fp32" for spec in ttl.plan({}, chars, bf16=True))
    results = {}
    for _ in range(40):  # every float32 run done, as the study would
        pending = [s for s in ttl.plan(results, chars, bf16=False) if s.run_id not in results]
        if not pending:
            break
        for spec in pending:
            results[spec.run_id] = dict(_result(spec.batch, spec.learning_rate, 500, 2.0, spec.seed, spec.warmup)[1],
                                        recipe=spec.recipe)
    assert not [s for s in ttl.plan(results, chars, bf16=False) if s.run_id not in results]
    bf16 = [s for s in ttl.plan(results, chars, bf16=True) if s.run_id not in results]
    assert bf16 and all(s.precision == "bf16" and s.batch <= ttl.BF16_MAX_BATCH for s in bf16)
    assert any(s.learning_rate == ttl.CHAR_RNN_LR and s.batch == ttl.CHAR_RNN_BATCH for s in bf16)
    assert all(s.run_id.endswith("-bf16") and "--precision" in ttl.train_command(s, chars, "cv/x") for s in bf16)


def test_points_measured_again_are_named_batch_threads_ranks_precision():
    assert ttl.point_list("100:1:1:bf16,50:2:1:fp32") == [(100, 1, 1, "bf16"), (50, 2, 1, "fp32")]
    for bad in ("100:1:1", "100:0:1:fp32", "100:1:1:fp16", "a:1:1:fp32"):
        with pytest.raises(Exception):
            ttl.point_list(bad)


def test_a_bad_point_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        ttl.main(["measure-speed", "--again", "100:1:1:fp16"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "--again" in err, err


def test_rounds_of_a_point_keep_the_median_round_and_every_mean():
    runs = [{"batch_size": 2, "threads": 2, "ranks": 1, "precision": "bf16", "mean_ms": m, "median_ms": m - 0.1,
             "iterations": 10, "load_average_before": load} for m, load in ((3.0, 1.0), (2.0, 2.0), (9.0, 3.0))]
    point = ttl._median_of_rounds(runs)
    assert point["mean_ms"] == 3.0 and point["median_ms"] == pytest.approx(2.9)
    assert point["round_means_ms"] == [3.0, 2.0, 9.0] and point["load_average_before"] == 1.0
    assert ttl._median_of_rounds(runs[:1]) == runs[0]


def test_the_ratio_points_alternate_the_precisions_at_each_row_count():
    layouts = ttl.ratio_layouts()
    assert [p for _, _, _, p in layouts] == list(ttl.PRECISIONS) * len(ttl.RATIO_ROWS)
    assert {b // t for b, t, _, _ in layouts} == set(ttl.RATIO_ROWS)
    assert not set(layouts) & set(ttl.speed_layouts(bf16=True))  # measured apart, in rounds


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit) as stopped:
        ttl.main(["measure-speed", "--again", "2:2:1:fp32", "--rounds", "0"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "--rounds" in err, err


def _done_plan(chars, bf16, iterations=lambda spec: 500):
    """Every run the plan asks for, done as the study would do them (`iterations` to 1.50 each)."""
    results = {}
    for _ in range(60):
        pending = [s for s in ttl.plan(results, chars, bf16=bf16) if s.run_id not in results]
        if not pending:
            return results
        for spec in pending:
            results[spec.run_id] = dict(_result(spec.batch, spec.learning_rate, iterations(spec), 2.0, spec.seed,
                                                spec.warmup, spec.precision)[1], recipe=spec.recipe)
    raise AssertionError("the plan never ran out")


def test_the_bfloat16_grid_surrounds_the_leaders_at_batch_100_and_200_and_does_not_chase_itself():
    chars = 1_115_394
    # the grid's runs all beat their leaders: were they centres, the plan would never end
    results = _done_plan(chars, bf16=True, iterations=lambda s: 300 if s.recipe == ttl.BF16_GRID else 500)
    grid = sorted((s["batch"], s["learning_rate"], s["warmup"]) for s in results.values()
                  if s["recipe"] == ttl.BF16_GRID)
    assert len(grid) == 8 and {b for b, _, _ in grid} == {100, 200}
    assert all(results[ttl.Spec(b, lr, w, 123, "", "bf16").run_id]["precision"] == "bf16" for b, lr, w in grid)
    assert not [s for s in _done_plan(chars, bf16=False).values() if s["recipe"] == ttl.BF16_GRID]


def test_the_bfloat16_grid_is_x1_2_around_the_rate_and_halves_doubles_or_adds_a_warm_up():
    chars = 1_115_394
    results = dict([_result(100, 1.568e-2, 546, 2.6, precision="bf16"), _result(100, 8e-3, 651, 3.1, precision="bf16"),
                    _result(200, 4.4e-2, 440, 4.2, warmup=105, precision="bf16"),
                    _result(200, 2.24e-2, 450, 4.3, warmup=105, precision="bf16"),
                    _result(100, 1e-3, 100, 0.5)])  # float32: not a bfloat16 leader
    got = {(s.batch, s.learning_rate, s.warmup) for s in ttl.bf16_grid(results, chars)}
    quarter = round(ttl.iterations_per_epoch(100, chars) / 4)
    assert got == {(100, 0.0188, 0), (100, 0.0131, 0), (100, 0.01568, quarter), (100, 0.0188, quarter),
                   (200, 0.0528, 105), (200, 0.0367, 105), (200, 0.044, 52), (200, 0.044, 210)}


def _evals(points):
    return [(i, i / 423, loss, i * 0.02) for i, loss in points]


def test_a_full_runs_best_is_over_every_evaluation_and_char_rnns_view_over_every_1000th():
    evals = _evals([(900, 1.50), (1000, 1.45), (1500, 1.38), (2000, 1.41), (2100, 1.44)])
    s = ttl.full_run_summary(evals)
    assert (s["best_val_loss"], s["best_at_iteration"], s["final_val_loss"], s["iterations"]) == (1.38, 1500, 1.44, 2100)
    assert s["train_seconds"] == pytest.approx(42.0)
    assert (s["char_rnn_evaluations"]["best_val_loss"], s["char_rnn_evaluations"]["best_at_iteration"]) == (1.41, 2000)
    # the last evaluation counts in char-rnn's view even off the 1000s
    assert ttl.full_run_summary(_evals([(1000, 1.5), (1100, 1.4)]))["char_rnn_evaluations"]["best_val_loss"] == 1.4


def test_the_full_run_trains_the_2_thread_recipe_for_50_epochs(tmp_path):
    (tmp_path / "recipes.json").write_text(json.dumps({"recipes": [
        {"threads": 1, "batch_size": 100, "lr_scaling": "none", "learning_rate": 1e-2, "lr_warmup": 0, "precision": "fp32"},
        {"threads": 2, "batch_size": 50, "lr_scaling": "none", "learning_rate": 7.84e-3, "lr_warmup": 10,
         "precision": "bf16"}]}))
    spec = ttl.recipe_spec(tmp_path)
    assert (spec.batch, spec.learning_rate, spec.warmup, spec.precision) == (50, 7.84e-3, 10, "bf16")
    cmd = ttl.train_command(spec, 1_115_394, "cv/x", epochs=ttl.FULL_EPOCHS, every=ttl.FULL_EVAL_EVERY)
    assert cmd[cmd.index("--max_epochs") + 1] == "50" and cmd[cmd.index("--eval_val_every") + 1] == "100"
    assert ttl.CHAR_RNN_EVAL_EVERY % ttl.FULL_EVAL_EVERY == 0  # char-rnn's evaluations are among ours
    flags = ttl.decay_flags(ttl.FAST_DECAY)
    assert flags == ["--learning_rate_decay", "0.9", "--learning_rate_decay_after", "3"]
    import argparse
    from phi_rnn.config import add_train_arguments  # the trainer takes them as the full run passes them
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data_dir", "d"] + flags)
    assert (args.learning_rate_decay, args.learning_rate_decay_after) == ttl.FAST_DECAY
    with pytest.raises(ValueError):
        ttl.recipe_spec(tmp_path, threads=64)


def _full_record(best_best, ref_best=1.3875):
    def run(batch, lr, precision, best):
        return {"batch": batch, "learning_rate": lr, "warmup": 0, "precision": precision, "iterations": 21150,
                "best_val_loss": best, "best_at_epoch": 12.0, "final_val_loss": 1.42, "train_seconds": 500.0, "median_ms_per_iteration": 28.0,
                "char_rnn_evaluations": {"best_val_loss": best + 0.002}}
    return {"epochs": 50, "threads": 1, "eval_val_every": 100,
            "best_minus_char_rnn": {"best_val_loss": best_best - ref_best},
            "runs": {"best": {**run(50, 7.84e-3, "bf16", best_best), "learning_rate_decay": 0.9,
                              "learning_rate_decay_after": 3},
                     "char-rnn": run(50, 2e-3, "fp32", ref_best)}}


def test_results_md_says_by_how_much_the_full_run_is_worse(tmp_path):
    assert ttl.full_run_section(tmp_path) == ""
    (tmp_path / "full-run.json").write_text(json.dumps(_full_record(1.3975)))
    text = ttl.full_run_section(tmp_path)
    assert "| best | 50 | 0.00784 | 0 | 0.9, 3 | bf16 | 21150 | 1.3975 (12.0) | 1.3995 | 1.4200 | 500 | 28.0 |" in text
    assert "| char-rnn | 50 | 0.002 | 0 | 0.97, 10 | fp32 | 21150 | 1.3875 (12.0) |" in text  # char-rnn's decay
    assert "0.0100 worse than char-rnn's" in text
    assert "no worse than char-rnn's" in ttl.full_run_markdown(_full_record(1.3800))


def test_a_full_run_without_recipes_is_one_line_and_bad_flags_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        ttl.main(["full-run", "--out", str(tmp_path), "--work", str(tmp_path / "cv")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "recipes.json" in err, err
    assert not (tmp_path / "cv").exists()  # nothing trained
    for damaged in ("{not json", json.dumps({"recipe": []}), json.dumps({"recipes": [{"threads": 2}]})):
        (tmp_path / "recipes.json").write_text(damaged)
        with pytest.raises(SystemExit) as stopped:
            ttl.main(["full-run", "--out", str(tmp_path), "--work", str(tmp_path / "cv")])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1 and "recipes.json" in err, (damaged, err)
    assert not (tmp_path / "cv").exists()
    with pytest.raises(SystemExit) as stopped:
        ttl.main(["full-run", "--jobs", "two"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err


def test_a_paused_iteration_moves_the_full_runs_seconds_but_not_its_median(tmp_path):
    from phi_rnn import metrics
    log = tmp_path / "run.metrics.csv"
    ms = [20.0, 22.0, 101_000.0, 21.0, 23.0]  # the third iteration stopped (SIGSTOP) for 101 s
    log.write_text(",".join(metrics.COLUMNS) + "\n" + "".join(
        f"{i + 1},{(i + 1) / 423},1.5,,0.002,0.1,{m},1.0,,\n" for i, m in enumerate(ms)))
    assert ttl.median_ms(log) == 22.0
    assert ttl.read_evals(log) == []  # no validation rows: nothing to call a best
