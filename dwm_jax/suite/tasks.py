"""The offline evaluation suite across domains: audio made on this machine, split so that a
probe measures generalisation.

The paper's findings are about transfer across kinds of audio. This suite mirrors the domains
of its nine-task linear evaluation with audio synthesised here, deterministically by seed,
from Debian packages (espeak-ng for speech, fluidsynth with the FluidR3 General MIDI
soundfont for instruments) and numpy:

=============  ===========================================  ================================
task           classes                                      splits disjoint by
=============  ===========================================  ================================
events         the 12 procedural event classes (synthetic)  recording condition (room, noise)
words          12 spoken words (Speech Commands' set)       speaker (espeak-ng voice variant)
speakers       16 speakers (8 voice variants x 2 pitches)   the words spoken (two vocabularies)
languages      10 languages, random phrases of their words  speaker
instruments    10 General MIDI families, 1-3 note phrases   instrument (GM program; 4 folds)
pitch          12 pitch classes over four octaves (C3-B6)   instrument (GM program)
=============  ===========================================  ================================

Every clip then passes a random recording channel (gain, spectral tilt, background noise at a
random SNR, sometimes a room), so no class is told apart by level or by a clean background.
Instruments comes in four folds (a leave-one-fold-out probe, as ESC-50's five folds): eight
programs a family are too few for one fixed held-out pair to give a stable score.
``python -m dwm_jax.suite --out suite --data_dir data`` writes each task as a folder of
WAV files with a labels.csv, builds it with the audio_folder builder as
``audio_folder/suite_<task>`` and checks that a linear probe on raw log-mel statistics is well
above chance and well below 100 %. ``make suite`` installs the Debian packages first.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import soundfile

from dwm_jax import config, data, probe, sed
from dwm_jax.data import synthetic

SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
RATE = 16000
TASKS = ("events", "words", "speakers", "languages", "instruments", "pitch")


def task_specs(specs: str) -> list[str]:
    """Comma-separated task specs -> a list, where 'suite' stands for the six suite datasets
    (``audio_folder/suite_<task>``)."""
    return [t for spec in specs.split(",") if spec
            for t in ([f"audio_folder/suite_{k}" for k in TASKS] if spec == "suite" else [spec])]


def short_name(task: str) -> str:
    """'audio_folder/suite_words' -> 'words' (table headers); other names as they are."""
    return task.removeprefix("audio_folder/suite_")

SPEAKERS = 16
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one")
# two disjoint vocabularies: speakers are trained on one and tested on the other
VOCAB_TRAIN = ("apple", "river", "window", "yellow", "garden", "morning", "table", "little",
               "music", "paper", "summer", "happy", "water", "number", "people", "silver")
VOCAB_TEST = ("orange", "mountain", "doctor", "purple", "kitchen", "evening", "pencil",
              "bottle", "market", "winter", "forest", "letter", "travel", "money", "picture",
              "animal")
# common words of each language (numbers one to ten and a few everyday words)
LANGUAGE_WORDS = {
    "en": "one two three four five six seven eight nine ten water house good day night bread",
    "de": "eins zwei drei vier fünf sechs sieben acht neun zehn Wasser Haus gut Tag Nacht Brot",
    "fr": "un deux trois quatre cinq six sept huit neuf dix eau maison bon jour nuit pain",
    "es": "uno dos tres cuatro cinco seis siete ocho nueve diez agua casa bueno día noche pan",
    "it": "uno due tre quattro cinque sei sette otto nove dieci acqua casa buono giorno notte "
          "pane",
    "pt": "um dois três quatro cinco seis sete oito nove dez água casa bom dia noite pão",
    "nl": "een twee drie vier vijf zes zeven acht negen tien water huis goed dag nacht brood",
    "pl": "jeden dwa trzy cztery pięć sześć siedem osiem dziewięć dziesięć woda dom dobry "
          "dzień noc chleb",
    "sv": "ett två tre fyra fem sex sju åtta nio tio vatten hus bra dag natt bröd",
    "fi": "yksi kaksi kolme neljä viisi kuusi seitsemän kahdeksan yhdeksän kymmenen vesi talo "
          "hyvä päivä yö leipä",
}
GM_FAMILIES = ("piano", "chromatic_percussion", "organ", "guitar", "bass", "strings",
               "ensemble", "brass", "reed", "pipe")   # programs 8k .. 8k+7
INSTRUMENT_FOLDS = 4                    # of two programs per family
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# C3..B6. (Version 1 also drew octave 2, 65-123 Hz, where a semitone is 4-7 Hz against the
# front end's 40 Hz STFT bins: its clips scored 0.15-0.24 for raw log-mel, trained encoders and
# an MLP alike, chance 0.08 - a test of the front end, not of a representation.)
PITCH_OCTAVES = range(3, 7)


class SuiteError(RuntimeError):
    """A tool the suite needs is missing or failed; the message says which."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """Clips per class in each split."""
    train: int
    valid: int
    test: int


SCALES = {"full": Scale(48, 12, 20), "small": Scale(3, 1, 2)}


# --------------------------------------------------------------------------- recording channel

def _room(rng, t60: float) -> np.ndarray:
    """An exponentially decaying noise impulse response with reverberation time t60 s."""
    n = max(int(RATE * t60), 16)
    ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
    ir[0] = 1.0
    return ir / np.sqrt(np.sum(ir ** 2))


def channel(x: np.ndarray, rng, *, room: tuple[float, float] = (0.0, 0.5),
            room_prob: float = 0.5, snr_db: tuple[float, float] = (5.0, 30.0),
            noise_slope: tuple[float, float] = (-2.0, 0.0)) -> np.ndarray:
    """A random recording channel: room (prob. ``room_prob``, t60 in ``room``), spectral
    tilt (-6..+6 dB/oct around 1 kHz), coloured background noise at an SNR in ``snr_db``, and
    a gain of -30..-6 dBFS. x: [samples] at RATE -> same length, float32."""
    x = x.astype(np.float64)
    if rng.uniform() < room_prob:
        ir = _room(rng, rng.uniform(*room))
        n = len(x) + len(ir) - 1
        x = np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(ir, n), n)[:len(x)]
    spec = np.fft.rfft(x)
    freqs = np.maximum(np.fft.rfftfreq(len(x), 1 / RATE), 20.0)
    spec *= 10 ** (rng.uniform(-6, 6) * np.log2(freqs / 1000.0) / 20)
    x = np.fft.irfft(spec, len(x))
    noise = synthetic._coloured_noise(len(x), RATE, rng.uniform(*noise_slope), rng)
    signal_rms = np.sqrt(np.mean(x ** 2)) + 1e-9
    noise *= signal_rms / (np.sqrt(np.mean(noise ** 2)) + 1e-9) / 10 ** (rng.uniform(*snr_db) / 20)
    x = x + noise
    x *= 10 ** (rng.uniform(-30, -6) / 20) / (np.max(np.abs(x)) + 1e-9)
    return x.astype(np.float32)


def _place(x: np.ndarray, seconds: float, rng) -> np.ndarray:
    """x at a random offset in a clip of ``seconds`` (cut if longer)."""
    n = int(RATE * seconds)
    x = x[:n]
    out = np.zeros(n, np.float64)
    start = rng.integers(0, n - len(x) + 1)
    out[start:start + len(x)] = x
    return out


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return x
    import librosa
    return librosa.resample(x, orig_sr=rate, target_sr=RATE)


# --------------------------------------------------------------------------- tools

def _need(tool: str, package: str):
    if shutil.which(tool) is None:
        raise SuiteError(f"{tool} is not installed: apt-get install {package} (make suite "
                         "installs it)")


def espeak_voices() -> list[str]:
    """The installed espeak-ng voice variants, sorted (the suite's speakers)."""
    _need("espeak-ng", "espeak-ng")
    out = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True,
                         check=True).stdout.splitlines()[1:]
    return sorted({line.split()[4].split("/")[-1] for line in out if len(line.split()) >= 5})


def speak(text: str, *, language: str, variant: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng speech as float [samples] at RATE."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-v", f"{language}+{variant}", "-s", str(rate), "-p",
                        str(pitch), "-w", f.name, text], check=True, capture_output=True)
        x, sr = soundfile.read(f.name, dtype="float64")
    return _resample(x, sr)


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(out))


def midi_file(program: int, notes: list[tuple[int, float, float, int]]) -> bytes:
    """A one-track MIDI file (120 bpm, 480 ticks a beat: 960 ticks a second) playing
    ``notes`` (pitch, start s, duration s, velocity) on ``program``."""
    events = []
    for pitch, start, dur, vel in notes:
        events.append((round(start * 960), 0x90, pitch, vel))
        events.append((round((start + dur) * 960), 0x80, pitch, 0))
    track, now = bytes([0, 0xC0, program]), 0
    for tick, kind, pitch, vel in sorted(events, key=lambda e: (e[0], e[1])):
        track += _vlq(tick - now) + bytes([kind, pitch, vel])
        now = tick
    track += b"\x00\xff\x2f\x00"
    return (b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big")
            + (480).to_bytes(2, "big") + b"MTrk" + len(track).to_bytes(4, "big") + track)


def render(program: int, clips: list[list[tuple[int, float, float, int]]],
           seconds: float) -> list[np.ndarray]:
    """Each clip's notes (times within the clip) on one GM program, rendered by fluidsynth in
    one run (the soundfont loads once), cut into clips of ``seconds`` each, mono, at RATE."""
    _need("fluidsynth", "fluidsynth")
    if not os.path.isfile(SOUNDFONT):
        raise SuiteError(f"{SOUNDFONT} is missing: apt-get install fluid-soundfont-gm")
    slot = seconds + 1.0  # a second of silence between clips for the release tails
    notes = [(p, i * slot + s, d, v) for i, clip in enumerate(clips) for p, s, d, v in clip]
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        with open(mid, "wb") as f:
            f.write(midi_file(program, notes))
        subprocess.run(["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6", "-r",
                        str(RATE), "-F", wav, SOUNDFONT, mid], check=True, capture_output=True)
        x, _ = soundfile.read(wav, dtype="float64", always_2d=True)
    x = x.mean(axis=1)
    n, step = int(RATE * seconds), int(RATE * slot)
    return [np.pad(x[i * step:i * step + n], (0, max(0, n - len(x[i * step:i * step + n]))))
            for i in range(len(clips))]


# --------------------------------------------------------------------------- tasks

def _split_items(items, seed: int, fractions=(0.6, 0.15)) -> dict[str, list]:
    """A seeded, disjoint train/valid/test partition of ``items``."""
    order = list(np.random.default_rng(seed).permutation(len(items)))
    n_train = max(1, round(len(items) * fractions[0]))
    n_valid = max(1, round(len(items) * fractions[1]))
    pick = [items[i] for i in order]
    return {"train": pick[:n_train], "valid": pick[n_train:n_train + n_valid],
            "test": pick[n_train + n_valid:]}


def _plan(scale: Scale, classes) -> list[tuple[str, int, str]]:
    """(split, index within split and class, class) for every clip."""
    return [(split, k, c) for split in ("train", "valid", "test")
            for c in classes for k in range(getattr(scale, split))]


def _fold_plan(scale: Scale, classes, folds: int) -> list[tuple[str, int, str]]:
    """('fold<j>', index, class) for every clip: the scale's clips per class dealt evenly
    into ``folds`` folds (a leave-one-fold-out task)."""
    per_fold = (scale.train + scale.valid + scale.test) // folds
    return [(f"fold{j + 1}", k, c) for j in range(folds) for c in classes
            for k in range(per_fold)]


def _rng(seed: int, task: str, *keys) -> np.random.Generator:
    digest = hashlib.sha256(repr((task,) + keys).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _events(scale, seed):
    # recording conditions disjoint across splits: dry rooms with pink-ish noise for train,
    # medium rooms for valid, large rooms with white-ish noise for test
    conditions = {"train": dict(room=(0.05, 0.3), room_prob=0.5, noise_slope=(-2.0, -1.0)),
                  "valid": dict(room=(0.3, 0.6), room_prob=0.8, noise_slope=(-1.0, -0.5)),
                  "test": dict(room=(0.6, 1.0), room_prob=1.0, noise_slope=(-0.5, 0.0))}
    for split, k, name in _plan(scale, synthetic.CLASS_NAMES):
        rng = _rng(seed, "events", split, k, name)
        x = synthetic.synthesize(synthetic.CLASS_NAMES.index(name), rng, sample_rate=RATE,
                                 seconds=3.0)
        yield split, name, f"{split}/{name}_{k:03d}.wav", channel(x, rng, **conditions[split]), \
            {"condition": split}


def _words(scale, seed):
    voices = _split_items(espeak_voices(), seed)
    for split, k, word in _plan(scale, WORDS):
        rng = _rng(seed, "words", split, k, word)
        voice = voices[split][rng.integers(len(voices[split]))]
        x = speak(word, language="en", variant=voice, rate=int(rng.integers(120, 200)),
                  pitch=int(rng.integers(20, 80)))
        yield split, word, f"{split}/{word}_{k:03d}.wav", \
            channel(_place(x, 1.5, rng), rng, room=(0.0, 0.3)), {"speaker": voice}


def _speakers(scale, seed):
    rng0 = _rng(seed, "speakers")
    voices = espeak_voices()
    # pairs of speakers share a voice variant and differ by their pitch (40 or 60, each
    # jittered by +-12 per clip, so the two overlap) and rate: not told apart by one cue
    chosen = [voices[i] for i in rng0.permutation(len(voices))[:SPEAKERS // 2]]
    speakers = {f"spk{2 * i + j:02d}_{v}": (v, 40 + 20 * j, int(rng0.integers(130, 190)))
                for i, v in enumerate(chosen) for j in range(2)}
    vocab = {"train": VOCAB_TRAIN[:12], "valid": VOCAB_TRAIN[12:], "test": VOCAB_TEST}
    for split, k, name in _plan(scale, sorted(speakers)):
        rng = _rng(seed, "speakers", split, k, name)
        variant, pitch, rate = speakers[name]
        words = [vocab[split][i] for i in rng.integers(0, len(vocab[split]), 3)]
        x = speak(" ".join(words), language="en", variant=variant,
                  rate=rate + int(rng.integers(-25, 26)), pitch=pitch + int(rng.integers(-12, 13)))
        yield split, name, f"{split}/{name}_{k:03d}.wav", \
            channel(_place(x, 3.0, rng), rng, room=(0.0, 0.6)), {"text": " ".join(words)}


def _languages(scale, seed):
    voices = _split_items(espeak_voices(), seed + 1)
    for split, k, lang in _plan(scale, sorted(LANGUAGE_WORDS)):
        rng = _rng(seed, "languages", split, k, lang)
        vocab = LANGUAGE_WORDS[lang].split()
        words = [vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(4, 7)))]
        voice = voices[split][rng.integers(len(voices[split]))]
        x = speak(" ".join(words), language=lang, variant=voice,
                  rate=int(rng.integers(130, 190)), pitch=int(rng.integers(25, 75)))
        yield split, lang, f"{split}/{lang}_{k:03d}.wav", \
            channel(_place(x, 3.0, rng), rng, room=(0.0, 0.3)), {"speaker": voice}


def _note_clips(task, clips, seed, program_split, make_notes, seconds=2.0):
    """Plans every clip of ``clips`` (split, index, class) with its program and notes,
    renders each program's clips in one fluidsynth run, yields them through the channel."""
    plan = []
    for split, k, name in clips:
        rng = _rng(seed, task, split, k, name)
        programs = program_split(name)[split]
        program = int(programs[rng.integers(len(programs))])
        plan.append((split, k, name, program, make_notes(name, program, rng), rng))
    audio = {}
    for program in sorted({p[3] for p in plan}):
        idx = [i for i, p in enumerate(plan) if p[3] == program]
        for i, x in zip(idx, render(program, [plan[i][4] for i in idx], seconds)):
            audio[i] = x
    for i, (split, k, name, program, notes, rng) in enumerate(plan):
        yield split, name, f"{split}/{name}_{k:03d}.wav", \
            channel(audio[i], rng, room=(0.0, 0.4), snr_db=(10.0, 35.0)), {"program": program}


def _family_range(family: str) -> tuple[int, int]:
    return {"bass": (28, 52), "piano": (40, 84), "strings": (43, 84)}.get(family, (48, 84))


def instrument_folds(seed: int) -> dict[str, dict[str, list[int]]]:
    """{family: {'fold<j>': GM programs}}: each family's eight programs dealt into
    INSTRUMENT_FOLDS folds by a seeded permutation."""
    per_fold = 8 // INSTRUMENT_FOLDS
    folds = {}
    for i, family in enumerate(GM_FAMILIES):
        order = np.random.default_rng([seed, 3 + i]).permutation(8)
        folds[family] = {f"fold{j + 1}": [8 * i + int(p) for p in
                                          order[j * per_fold:(j + 1) * per_fold]]
                         for j in range(INSTRUMENT_FOLDS)}
    return folds


def _instruments(scale, seed):
    # the probe is leave-one-fold-out: a family is learnt from six programs and tested on two
    # never heard, and every program is tested once. (Version 1 tested on programs 8k+6 and
    # 8k+7 only - GM's odd members: timpani under strings, orchestra hit under ensemble, synth
    # brass - and a fixed split of two programs a family made the score hang on which two:
    # 0.18-0.27 for raw log-mel over three seeded splits.)
    folds = instrument_folds(seed)

    def notes(family, program, rng):
        lo, hi = _family_range(family)
        out, t = [], float(rng.uniform(0.0, 0.3))
        for _ in range(int(rng.integers(1, 4))):
            dur = float(rng.uniform(0.25, 0.8))
            out.append((int(rng.integers(lo, hi)), t, dur, int(rng.integers(60, 120))))
            t += dur + float(rng.uniform(0.0, 0.15))
        return out
    yield from _note_clips("instruments", _fold_plan(scale, GM_FAMILIES, INSTRUMENT_FOLDS),
                           seed, folds.__getitem__, notes)


def _pitch(scale, seed):
    # melodic programs 0-103 (sound effects and percussive 104+ left out);
    # 60/15/25 % of them for train/valid/test, so test instruments are never heard in training
    melodic = list(range(104))
    split = _split_items(melodic, seed + 2, fractions=(0.6, 0.15))

    yield from _note_clips("pitch", _plan(scale, PITCH_CLASSES), seed, lambda _: split,
                           lambda pitch_class, program, rng: pitch_note(pitch_class, rng))


def pitch_note(pitch_class: str, rng) -> list[tuple[int, float, float, int]]:
    """One note (MIDI number, start s, duration s, velocity) of ``pitch_class`` in a random
    octave of PITCH_OCTAVES."""
    octave = int(rng.integers(PITCH_OCTAVES.start, PITCH_OCTAVES.stop))
    midi = 12 * (octave + 1) + PITCH_CLASSES.index(pitch_class)
    return [(midi, float(rng.uniform(0.0, 0.3)), float(rng.uniform(0.6, 1.4)),
             int(rng.integers(70, 120)))]


SCENE_SECONDS = 10.0


def _scenes(scale, seed):
    """Strong labels: 10-second scenes, each with 2-5 events of the 12 procedural classes
    (0.3-2.5 s, at random times, overlaps allowed, 0-15 dB above a coloured background),
    through the recording channel; recording conditions disjoint across splits, as in
    ``events``. Five scenes per clip of the scale's per-class count."""
    conditions = {"train": dict(room=(0.05, 0.3), room_prob=0.5, noise_slope=(-2.0, -1.0)),
                  "valid": dict(room=(0.3, 0.6), room_prob=0.8, noise_slope=(-1.0, -0.5)),
                  "test": dict(room=(0.6, 1.0), room_prob=1.0, noise_slope=(-0.5, 0.0))}
    n = int(RATE * SCENE_SECONDS)
    for split in ("train", "valid", "test"):
        for k in range(5 * getattr(scale, split)):
            rng = _rng(seed, "scenes", split, k)
            background = synthetic._coloured_noise(n, RATE, rng.uniform(-2.0, -0.5), rng)
            clip, events = background / synthetic._rms(background) * 0.1, []
            for _ in range(int(rng.integers(2, 6))):
                cid = int(rng.integers(synthetic.NUM_CLASSES))
                length = int(RATE * rng.uniform(0.3, 2.5))
                start = int(rng.integers(0, n - length + 1))
                event = synthetic._event(cid, length, RATE, rng)
                level = 0.1 * 10 ** (rng.uniform(0, 15) / 20)
                clip[start:start + length] += level * event / synthetic._rms(event)
                events.append((round(start / RATE, 3), round((start + length) / RATE, 3),
                               synthetic.CLASS_NAMES[cid]))
            x = channel(clip, rng, snr_db=(20.0, 40.0), **conditions[split])
            yield split, "", f"{split}/scene_{k:04d}.wav", x, {"condition": split,
                                                                "events": events}


GENERATORS = {"events": _events, "words": _words, "speakers": _speakers,
              "languages": _languages, "instruments": _instruments, "pitch": _pitch,
              "scenes": _scenes}
# frame-level tasks (an events table; evaluated by dwm_jax.sed), not part of "suite"
FRAME_TASKS = ("scenes",)
# bumped when a task's generator makes other audio or splits: build_task then remakes the
# task's audio and rebuilds its dataset instead of reusing them
VERSIONS = {"events": 1, "words": 1, "speakers": 1, "languages": 1, "instruments": 2,
            "pitch": 2, "scenes": 1}
STAMP = "suite_task.json"  # in each task folder: what made its audio


def _stamp(task: str, scale: Scale, seed: int) -> dict:
    return {"task": task, "version": VERSIONS[task], "scale": dataclasses.asdict(scale),
            "seed": seed}


def make_task(task: str, out_dir: str, scale: Scale, seed: int = 0) -> str:
    """Writes ``out_dir/<task>/audio/<split>/*.wav`` and ``labels.csv`` (filename, label,
    split, and what the split is disjoint by); returns the CSV's path. Deterministic in
    (task, scale, seed) for given versions of espeak-ng, fluidsynth and the soundfont."""
    root = os.path.join(out_dir, task)
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    rows, events = [], []
    for split, label, rel, x, extra in GENERATORS[task](scale, seed):
        path = os.path.join(tmp, "audio", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        soundfile.write(path, x, RATE, subtype="PCM_16")
        events += [(rel, *event) for event in extra.pop("events", ())]
        rows.append({"filename": rel, "label": label, "split": split, **extra})
    _write_csv(os.path.join(tmp, "labels.csv"), list(rows[0]), [list(r.values()) for r in rows])
    if task in FRAME_TASKS:
        _write_csv(os.path.join(tmp, "events.csv"),
                   ["filename", "onset", "offset", "event_label"], events)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(_stamp(task, scale, seed), f)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)  # a killed run leaves only the .partial folder
    return os.path.join(root, "labels.csv")


def _write_csv(path: str, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def made_with(task_dir: str) -> dict | None:
    """The stamp of a task folder's audio; a folder from before stamps (it has labels.csv)
    counts as version 1, made at the scale and seed now asked for."""
    path = os.path.join(task_dir, STAMP)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"version": 1} if os.path.isfile(os.path.join(task_dir, "labels.csv")) else None


def build_task(task: str, out_dir: str, data_dir: str, scale_name: str, seed: int = 0):
    """Makes a task's audio unless it was made by this generator version, scale and seed,
    and builds audio_folder/suite_<task>; remade audio replaces the built dataset."""
    scale = SCALES[scale_name]
    name = f"suite_{task}" if scale_name == "full" else f"suite_{task}_{scale_name}"
    task_dir = os.path.join(out_dir, task)
    wanted, stamp = _stamp(task, scale, seed), made_with(task_dir)
    if stamp is None or {**wanted, **stamp} != wanted:
        # the old dataset goes first: a run killed before the rebuild cannot leave it behind
        shutil.rmtree(os.path.join(data_dir, "audio_folder", name), ignore_errors=True)
        make_task(task, out_dir, scale, seed)
    frame = dict(label_column="", events=os.path.join(task_dir, "events.csv")) \
        if task in FRAME_TASKS else {}
    cfg = data.audio_folder_config(name, audio_dir=os.path.join(task_dir, "audio"),
                                   csv_path=os.path.join(task_dir, "labels.csv"), **frame)
    data.build("audio_folder", data_dir, config=cfg)
    return f"audio_folder/{name}"


def check_raw_probe(data_dir: str, dataset: str) -> dict:
    """The raw log-mel linear probe's test score (accuracy; segment F1 for a frame-level
    task), chance, and whether the task is in the useful range (above 2x chance, or 1.3x
    for the segment F1 whose chance is every class everywhere; below 0.9)."""
    if sed.is_frame_level(data_dir, dataset):
        r = sed.evaluate_frame_task(dataset, data_dir, {"raw_logmel": (
            sed.raw_step_features, None, 16)}, config.sed_base())
        score = r["raw_logmel"]["test_score"]
        return {"task": dataset, "classes": r["num_classes"], "test_clips": r["num_test"],
                "raw_logmel": score, "chance": r["chance"],
                "event_f1": r["raw_logmel"]["event_f1"],
                "ok": bool(score > 1.3 * r["chance"] and score < 0.9)}
    r = probe.evaluate_task(dataset, data_dir, {"raw_logmel": (probe.raw_features, None)})
    acc = r["raw_logmel"]["test_accuracy"]
    return {"task": dataset, "classes": r["num_classes"], "test_clips": r["num_test"],
            "raw_logmel": acc, "chance": r["chance"],
            "ok": bool(acc > 2 * r["chance"] and acc < 0.9)}


def versions() -> dict:
    """The tools the audio came from (the suite is deterministic for these)."""
    out = {}
    for tool, args in (("espeak-ng", ["--version"]), ("fluidsynth", ["--version"])):
        if shutil.which(tool):
            text = subprocess.run([tool] + args, capture_output=True, text=True).stdout
            out[tool] = text.strip().splitlines()[0] if text.strip() else "?"
    if os.path.isfile(SOUNDFONT):
        out["soundfont"] = f"{os.path.basename(SOUNDFONT)} {os.path.getsize(SOUNDFONT)} bytes"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dwm_jax.suite", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="suite", help="where the audio folders are written")
    p.add_argument("--data_dir", default="data", help="where the datasets are built")
    p.add_argument("--tasks", default=",".join(TASKS + FRAME_TASKS),
                   help="comma-separated: " + ",".join(TASKS + FRAME_TASKS))
    p.add_argument("--scale", default="full", choices=sorted(SCALES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_check", action="store_true", help="skip the raw log-mel probe check")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        print(f"python -m dwm_jax.suite: error: unknown task(s) {unknown}; known: "
              f"{', '.join(TASKS + FRAME_TASKS)}", file=sys.stderr)
        return 2
    results = []
    try:
        for task in tasks:
            dataset = build_task(task, args.out, args.data_dir, args.scale, args.seed)
            print(f"built {dataset}", flush=True)
            if not args.no_check:
                results.append(check_raw_probe(args.data_dir, dataset))
    except SuiteError as e:
        print(f"python -m dwm_jax.suite: error: {e}", file=sys.stderr)
        return 2
    if not results:  # nothing checked: the last checks' record stays
        return 0
    # suite.json: the latest check of every task (those not checked now are kept)
    record = os.path.join(args.out, "suite.json")
    kept = []
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
        if (old.get("scale"), old.get("seed")) == (args.scale, args.seed):
            kept = [c for c in old.get("checks", [])
                    if c["task"] not in {r["task"] for r in results}]
    with open(record, "w") as f:
        json.dump({"versions": versions(), "scale": args.scale, "seed": args.seed,
                   "checks": sorted(kept + results, key=lambda c: c["task"])}, f, indent=1)
    print("| task | classes | test clips | raw log-mel probe | chance | in range |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['task']} | {r['classes']} | {r['test_clips']} | {r['raw_logmel']:.3f} "
              f"| {r['chance']:.3f} | {'yes' if r['ok'] else 'NO'} |")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
