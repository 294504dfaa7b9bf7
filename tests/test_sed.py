"""Frame-level evaluation: strong labels in the data layer, the SED metrics against sed_eval
and hand-computed values, and the frame-level probe end to end."""

import types

import numpy as np
import pytest

from dwm_jax import data

soundfile = pytest.importorskip("soundfile")


def _wav(path, seconds=2.0, seed=0):
    x = 0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))
    soundfile.write(str(path), x.astype(np.float32), 16000)


def _folder(tmp_path, events_rows, files=("a.wav", "b.wav", "c.wav")):
    clips = tmp_path / "clips"
    clips.mkdir(exist_ok=True)
    for i, name in enumerate(files):
        _wav(clips / name, seed=i)
    (tmp_path / "list.csv").write_text(
        "filename,split\n" + "".join(f"{f},train\n" for f in files))
    (tmp_path / "events.tsv").write_text(
        "filename\tonset\toffset\tevent_label\n" + "".join(r + "\n" for r in events_rows))
    return data.audio_folder_config("sed", audio_dir=str(clips),
                                    csv_path=str(tmp_path / "list.csv"), label_column="",
                                    events=str(tmp_path / "events.tsv"))


def test_strong_labels_become_frame_targets_at_the_front_ends_rate(tmp_path):
    """Frames are 10 ms apart (hop 160 at 16 kHz), frame i centred at i * 10 ms; an event
    covers frames floor(onset * 100) .. ceil(offset * 100) - 1, cut to the clip."""
    cfg = _folder(tmp_path, ["a.wav\t0.5\t1.0\tdog", "a.wav\t0.0\t0.105\tbird",
                             "c.wav\t1.995\t2.0\tdog", "c.wav\t0.333\t0.337\tbird"])
    data.build("audio_folder", str(tmp_path / "d"), config=cfg)
    split = data.open_split(str(tmp_path / "d"), "audio_folder/sed", "train")
    assert split.event_labels == ("bird", "dog") and split.label_names is None
    by_name = {split.source[i]["filename"].decode(): split.source[i] for i in range(len(split))}
    frames = 1 + 32000 // 160                               # librosa's centred frames: 201
    want = {name: np.zeros((2, frames), np.uint8) for name in ("a.wav", "b.wav", "c.wav")}
    want["a.wav"][1, 50:100] = 1                            # dog 0.5 .. 1.0: frames 50..99
    want["a.wav"][0, 0:11] = 1                              # bird 0 .. 0.105: 0..10 (ceil)
    want["c.wav"][1, 199:200] = 1                           # 1.995 .. 2.0: frame 199 only
    want["c.wav"][0, 33:34] = 1                             # 0.333 .. 0.337: inside frame 33
    for name, example in by_name.items():
        assert example["log_mel"].shape[1] == frames
        np.testing.assert_array_equal(example["frame_labels"], want[name], err_msg=name)


@pytest.mark.parametrize("row,message", [
    ("a.wav\t1.0\t0.5\tdog", r"events.tsv:2: offset 0.5 is not after onset 1.0"),
    ("a.wav\t0.5\t2.5\tdog", r"events.tsv:2: offset 2.5 s is beyond the clip"),
    ("z.wav\t0.5\t1.0\tdog", r"events.tsv:2: z.wav is not a file of the dataset"),
    ("a.wav\tsoon\t1.0\tdog", r"events.tsv:2: onset 'soon' / offset '1.0' are not times"),
    ("a.wav\t0.5\t1.0\t ", r"events.tsv:2: empty label"),
    ("a.wav\t0.5\tinf\tdog", r"events.tsv:2: offset inf must be a finite time"),
    ("a.wav\t-inf\t1.0\tdog", r"events.tsv:2: onset -inf must be a finite time >= 0"),
])
def test_bad_event_rows_are_named(tmp_path, row, message):
    cfg = _folder(tmp_path, [row])
    with pytest.raises(ValueError, match=message):
        data.build("audio_folder", str(tmp_path / "d"), config=cfg)


def test_one_file_named_two_ways_keeps_every_event_and_overlaps_are_merged(tmp_path, capsys):
    """c.wav, ./c.wav and its absolute path are one file: all their rows count. Two dog rows
    that overlap become one reference event, as the frame targets hold them; scored against
    that event our event F1 is sed_eval's."""
    absolute = tmp_path / "clips" / "c.wav"
    cfg = _folder(tmp_path, ["c.wav\t0.0\t1.0\tdog", "./c.wav\t0.5\t1.5\tdog",
                             f"{absolute}\t1.7\t1.9\tbird", "b.wav\t0.2\t0.4\tdog",
                             "./b.wav\t0.4\t0.6\tdog"])
    data.build("audio_folder", str(tmp_path / "d"), config=cfg)
    err = capsys.readouterr().err
    assert "2 event row(s) of" in err and "are merged with it" in err, err
    split = data.open_split(str(tmp_path / "d"), "audio_folder/sed", "train")
    by_name = {split.source[i]["filename"].decode(): split.source[i] for i in range(len(split))}
    targets = by_name["c.wav"]["frame_labels"]
    assert targets[1, 0:150].all() and not targets[1, 150:].any()       # dog 0 .. 1.5
    assert targets[0, 170:190].all() and targets[0].sum() == 20          # bird 1.7 .. 1.9
    reference = [sed.reference_events(by_name[n]["frame_labels"], 100.0, split.event_labels)
                 for n in ("b.wav", "c.wav")]
    assert [[(round(on, 6), round(off, 6), label) for on, off, label in r]
            for r in reference] == [[(0.2, 0.6, "dog")], [(1.7, 1.9, "bird"), (0.0, 1.5, "dog")]]
    estimated = [[(0.2, 0.6, "dog")], [(0.0, 1.5, "dog"), (1.7, 1.9, "bird")]]
    ours = sed.event_metrics(reference, estimated, 0.2, 0.2)["f1"]
    sed_eval = pytest.importorskip("sed_eval")
    dcase_util = pytest.importorskip("dcase_util")
    metric = sed_eval.sound_event.EventBasedMetrics(event_label_list=["bird", "dog"],
                                                    t_collar=0.2, percentage_of_length=0.2)
    for i, (ref, est) in enumerate(zip(reference, estimated)):
        metric.evaluate(*(dcase_util.containers.MetaDataContainer([
            dict(filename=f"f{i}", onset=on, offset=off, event_label=label)
            for on, off, label in found]) for found in (ref, est)))
    assert ours == 1.0 == pytest.approx(metric.results_overall_metrics()[
        "f_measure"]["f_measure"])


# ---------------------------------------------------------------------------- the metrics

from dwm_jax import sed  # noqa: E402

HAND_REFERENCE = [[(0.5, 1.5, "dog"), (2.0, 2.4, "cat")], [(0.0, 1.0, "dog")]]
HAND_ESTIMATED = [[(0.6, 1.4, "dog"), (3.0, 3.5, "cat")], []]


def test_metrics_on_a_hand_computed_case():
    """Event based: one match of three references and two estimates -> F1 2/(2+1+2) = 0.4.
    Segment based (1 s): file 1 has segments 0-3 (dog in 0, 1 both; cat in 2 missed, in 3
    inserted), file 2 one missed dog: TP 2, FP 1, FN 2 -> F1 4/7; ER (0 + 2 + 1) / 4."""
    ev = sed.event_metrics(HAND_REFERENCE, HAND_ESTIMATED, collar=0.2, offset_fraction=0.2)
    assert ev["f1"] == pytest.approx(0.4) and ev["precision"] == 0.5
    seg = sed.segment_metrics(HAND_REFERENCE, HAND_ESTIMATED, ["cat", "dog"], segment=1.0)
    assert seg["f1"] == pytest.approx(4 / 7) and seg["error_rate"] == pytest.approx(0.75)


def _random_files(rng, labels, files=4):
    out = []
    for _ in range(files):
        events = []
        for _ in range(rng.integers(0, 6)):
            onset = round(float(rng.uniform(0, 9)), 2)
            events.append((onset, round(onset + float(rng.uniform(0.05, 2)), 2),
                           labels[rng.integers(len(labels))]))
        out.append(events)
    return out


def _jitter(rng, files):
    """Estimates near the references (some within the collars, some not), some dropped,
    some inserted."""
    out = []
    for events in files:
        moved = [(max(0.0, round(on + float(rng.normal(0, 0.15)), 2)),
                  round(off + float(rng.normal(0, 0.25)), 2), label)
                 for on, off, label in events if rng.random() > 0.2]
        out.append([(on, max(off, on + 0.01), label) for on, off, label in moved]
                   + _random_files(rng, ["dog", "cat", "bird"], 1)[0][:1])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_sed_eval(seed):
    sed_eval = pytest.importorskip("sed_eval")
    dcase_util = pytest.importorskip("dcase_util")
    labels = ["bird", "cat", "dog"]
    rng = np.random.default_rng(seed)
    reference = _random_files(rng, labels)
    estimated = _jitter(rng, reference)
    if seed == 0:
        reference, estimated = HAND_REFERENCE, HAND_ESTIMATED
    segments = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=labels,
                                                        time_resolution=1.0)
    events = sed_eval.sound_event.EventBasedMetrics(event_label_list=labels, t_collar=0.2,
                                                    percentage_of_length=0.2)

    def container(found, name):
        return dcase_util.containers.MetaDataContainer([
            dict(filename=name, onset=on, offset=off, event_label=label)
            for on, off, label in found])

    for i, (ref, est) in enumerate(zip(reference, estimated)):
        r, e = container(ref, f"f{i}.wav"), container(est, f"f{i}.wav")
        segments.evaluate(reference_event_list=r, estimated_event_list=e)
        events.evaluate(reference_event_list=r, estimated_event_list=e)
    theirs_seg = segments.results_overall_metrics()
    theirs_ev = events.results_overall_metrics()
    ours_seg = sed.segment_metrics(reference, estimated, labels, 1.0)
    ours_ev = sed.event_metrics(reference, estimated, 0.2, 0.2)
    assert ours_seg["f1"] == pytest.approx(theirs_seg["f_measure"]["f_measure"], abs=1e-9)
    assert ours_seg["error_rate"] == pytest.approx(theirs_seg["error_rate"]["error_rate"],
                                                   abs=1e-9)
    assert ours_ev["f1"] == pytest.approx(theirs_ev["f_measure"]["f_measure"], abs=1e-9)


def test_a_median_window_beyond_the_clips_is_refused_naming_the_flag():
    from dwm_jax import config as config_lib
    from dwm_jax import probe
    cfg = config_lib.sed_base()
    cfg.median_window_s = 1e9
    with pytest.raises(config_lib.ConfigError, match=r"--sed.median_window_s must be <= 60"):
        config_lib.check_sed(cfg)
    cfg.median_window_s = 12.0                       # within the schema, beyond these clips
    clips = types.SimpleNamespace(seconds=[10.0, 4.0])
    with pytest.raises(probe.ProbeError, match=r"--sed.median_window_s=12 is longer than the "
                       r"task's longest clip \(10.00 s\)"):
        sed.probe_frames(clips, clips, clips, cfg, step_s=0.16)


def test_post_processing():
    probs = np.array([[0.1], [0.9], [0.1], [0.8], [0.9], [0.7], [0.2]])
    smoothed = sed.median_filter(probs, 3)
    np.testing.assert_allclose(smoothed[:, 0], [0.1, 0.1, 0.8, 0.8, 0.8, 0.7, 0.2])
    events = sed.decode(smoothed >= 0.5, 0.16, ["dog"], end=1.0)
    assert events == [(pytest.approx(0.32), pytest.approx(0.96), "dog")]
    frames = np.zeros((1, 40), np.uint8)
    frames[0, 3:20] = 1
    np.testing.assert_array_equal(sed.step_targets(frames, 3, 16)[:, 0], [1, 1, 0])
    assert sed.reference_events(frames, 100.0, ["dog"]) == [
        (pytest.approx(0.03), pytest.approx(0.2), "dog")]


# ------------------------------------------------------------- the suite's scenes, the probe

import csv  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from dwm_jax.suite import tasks as suite  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """The suite's scenes task at its small scale (15 / 5 / 10 scenes), built."""
    out = tmp_path_factory.mktemp("scenes")
    dataset = suite.build_task("scenes", str(out / "suite"), str(out / "data"), "small")
    return out, dataset


@pytest.mark.slow
def test_scenes_have_events_inside_them_and_splits_by_recording_condition(scenes):
    out, _ = scenes
    with open(out / "suite" / "scenes" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "suite" / "scenes" / "events.csv", newline="") as f:
        events = list(csv.DictReader(f))
    assert [sum(r["split"] == s for r in rows) for s in ("train", "valid", "test")] == [
        15, 5, 10]
    assert all(r["condition"] == r["split"] for r in rows)      # conditions never shared
    per_file = {}
    for e in events:
        assert 0 <= float(e["onset"]) < float(e["offset"]) <= suite.SCENE_SECONDS
        assert e["event_label"] in suite.synthetic.CLASS_NAMES
        per_file.setdefault(e["filename"], []).append(e)
    assert set(per_file) == {r["filename"] for r in rows}
    assert all(2 <= len(v) <= 5 for v in per_file.values())
    clip = soundfile.read(str(out / "suite" / "scenes" / "audio" / rows[0]["filename"]))[0]
    assert len(clip) == 16000 * suite.SCENE_SECONDS


@pytest.mark.slow
def test_the_raw_baseline_finds_the_task_neither_trivial_nor_impossible(scenes):
    out, dataset = scenes
    check = suite.check_raw_probe(str(out / "data"), dataset)
    assert check["ok"], check
    assert check["chance"] < check["raw_logmel"] < 0.9


@pytest.mark.slow
def test_a_model_is_probed_at_frame_level_end_to_end(scenes, trained_run):
    """eval.py picks the frame-level protocol from the dataset and writes every score."""
    out, dataset = scenes
    res = subprocess.run([sys.executable, "eval.py", f"--workdir={trained_run}",
                          f"--tasks={dataset}", f"--data_dir={out / 'data'}",
                          "--sed.median_window_s=0.32"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.load(open(os.path.join(trained_run, "eval", "results.json")))
    r = next(t for t in result["tasks"] if t["dataset"] == dataset)
    assert r["metric"] == "segment F1 (1 s)" and r["num_test"] == 10 and r["num_classes"] == 12
    for name in ("encoder", "random_init", "raw_logmel"):
        s = r[name]
        assert 0.0 <= s["event_f1"] <= 1.0 and 0.0 <= s["segment_f1"] <= 1.0
        assert s["segment_er"] >= 0.0 and s["threshold"] in suite.config.sed_base().thresholds
        assert s["median_window_steps"] == 3
        if importlib.util.find_spec("sed_scores_eval") is not None:   # make test installs it
            assert 0.0 <= s["psds1"] <= 1.0 and 0.0 <= s["psds2"] <= 1.0
    assert r["raw_logmel"]["segment_f1"] > r["chance"]
    assert "segment F1 (1 s)" in res.stdout and "event F1" in res.stdout


def test_the_study_table_has_a_where_in_time_column():
    from dwm_jax.study import run as study
    tasks = ["synthetic_sounds", "audio_folder/suite_scenes"]
    runs = []
    for strategy, base in (("random", 0.5), ("dispersion", 0.6)):
        for seed in (0, 1):
            scores = {"synthetic_sounds": dict(encoder=base + seed / 100, random_init=0.4,
                                               raw_logmel=0.3, data="a"),
                      "audio_folder/suite_scenes": dict(
                          encoder=base / 2, encoder_event_f1=base / 4, random_init=0.2,
                          random_init_event_f1=0.1, raw_logmel=0.25, raw_logmel_event_f1=0.12,
                          data="b")}
            runs.append(dict(strategy=strategy, seed=seed, tasks=scores, mask_ms=1.0,
                             step_ms=10.0))
    table = study.summarise(runs, ["random", "dispersion"], tasks)
    assert "| strategy | seeds | synthetic_sounds | scenes: segment F1 | scenes: event F1 | mean" \
        in table
    # the mean is over clip-level tasks only: 0.505 for random
    assert "| random | 2 | 0.505 ± 0.007 | 0.250 ± 0.000 | 0.125 ± 0.000 | 0.505 ± 0.007 |" \
        in table
    assert "| dispersion − random | 2 | 0.100 ± 0.000 | 0.050 ± 0.000 | 0.025 ± 0.000 |" in table


def test_the_data_cli_builds_strong_labels(tmp_path, capsys):
    from dwm_jax.data import cli
    cfg = _folder(tmp_path, ["a.wav\t0.5\t1.0\tdog"])
    assert cli.main(["audio_folder", "--name", "sed", "--audio_dir", cfg.audio_dir,
                     "--csv", cfg.csv, "--label_column", "", "--events", cfg.events,
                     "--data_dir", str(tmp_path / "d")]) == 0
    split = data.open_split(str(tmp_path / "d"), "audio_folder/sed", "train")
    assert split.event_labels == ("dog",)
    assert sum(int(split.source[i]["frame_labels"].sum()) for i in range(len(split))) == 50
    # a bad row through the CLI: one line, exit 2
    (tmp_path / "events.tsv").write_text("filename\tonset\toffset\tevent_label\n"
                                         "a.wav\t0.9\t0.2\tdog\n")
    assert cli.main(["audio_folder", "--name", "sed2", "--audio_dir", cfg.audio_dir,
                     "--csv", cfg.csv, "--label_column", "", "--events", cfg.events,
                     "--data_dir", str(tmp_path / "d")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("python -m dwm_jax.data: error: ")
    assert "events.tsv:2: offset 0.2 is not after onset 0.9" in errors[0]


def _steps(seconds, step_s, active):
    """Scores [T', 1]: 1 on the steps inside the ``active`` (onset, offset) spans, else 0."""
    t = np.arange(int(np.ceil(seconds / step_s))) * step_s
    on = np.zeros((len(t), 1))
    for a, b in active:
        on[(t >= a) & (t < b), 0] = 1.0
    return on


def test_psds_on_hand_made_cases():
    """Two 4 s clips, one class, steps of 0.5 s. A perfect detector scores 1 in both DCASE
    scenarios. One that finds one of two events (and at its lowest threshold marks both
    clips whole, 450 false positives an hour, past e_max = 100) has a true-positive rate of
    0.5 over the whole eFPR range: 0.5 in both."""
    pytest.importorskip("sed_scores_eval")
    seconds = [4.0, 4.0]
    perfect = sed.psds([_steps(4, 0.5, [(1.0, 2.0)]), _steps(4, 0.5, [])], seconds,
                       [[(1.0, 2.0, "a")], []], ["a"], 0.5)
    assert perfect == pytest.approx({"psds1": 1.0, "psds2": 1.0})
    reference = [[(0.5, 1.0, "a"), (2.5, 3.0, "a")], []]
    half = sed.psds([_steps(4, 0.5, [(0.5, 1.0)]), _steps(4, 0.5, [])], seconds, reference,
                    ["a"], 0.5)
    assert half == pytest.approx({"psds1": 0.5, "psds2": 0.5})
    # a clip whose last step runs past its end is cut there; a 3.2 s clip with steps of 0.5
    late = sed.psds([_steps(3.2, 0.5, [(3.0, 3.2)])], [3.2], [[(3.0, 3.2, "a")]], ["a"], 0.5)
    assert late == pytest.approx({"psds1": 1.0, "psds2": 1.0})
    # two classes (PSDS2's cross-trigger term runs): each found exactly
    both = sed.psds([np.hstack([_steps(4, 0.5, [(1.0, 2.0)]), _steps(4, 0.5, [(3.0, 4.0)])])],
                    [4.0], [[(1.0, 2.0, "a"), (3.0, 4.0, "b")]], ["a", "b"], 0.5)
    assert both == pytest.approx({"psds1": 1.0, "psds2": 1.0})
