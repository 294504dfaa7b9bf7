"""An unlabelled pretraining corpus across domains, made on this machine: not the evaluation
data, but the same kinds of audio and mixtures of them.

Each 10 s clip is one of: speech (phrases in the suite's ten languages and in English words
of all three word lists, by random voice variants, pitches and rates, with pauses), music
(melodies, chords and bass lines on random General MIDI programs, several at once),
procedural events (several of the twelve classes in sequence) or a mixture of two of those at
a random level difference; then the suite's random recording channel. The streams of random
numbers are the corpus's own (seeded by ``("corpus", index)``), so no clip repeats one of
the suite's, though voices, instruments and event classes are shared, as in real
pretraining data.

``python -m dwm_jax.suite.corpus --out corpus --data_dir data --hours 3`` writes the WAV files
and builds them, unlabelled, as ``audio_folder/corpus`` (split ``train``); ``make corpus``
installs the Debian packages first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import soundfile

from dwm_jax import data
from dwm_jax.data import synthetic
from dwm_jax.suite import tasks as suite

SECONDS = 10.0
KINDS = ("speech", "music", "events", "mixture")
KIND_WEIGHTS = (0.3, 0.3, 0.15, 0.25)


def _speech(rng, voices) -> np.ndarray:
    """Phrases with pauses until the clip is full: one voice, one language a clip."""
    lang = list(suite.LANGUAGE_WORDS)[rng.integers(len(suite.LANGUAGE_WORDS))]
    vocab = (suite.LANGUAGE_WORDS[lang].split() if lang != "en" else
             list(suite.WORDS + suite.VOCAB_TRAIN + suite.VOCAB_TEST))
    variant = voices[rng.integers(len(voices))]
    pitch, rate = int(rng.integers(20, 80)), int(rng.integers(120, 200))
    n = int(suite.RATE * SECONDS)
    out, t = np.zeros(n), int(rng.integers(0, suite.RATE))
    while t < n:
        words = [vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(2, 8)))]
        x = suite.speak(" ".join(words), language=lang, variant=variant, rate=rate, pitch=pitch)
        x = x[:n - t]
        out[t:t + len(x)] += x
        t += len(x) + int(rng.uniform(0.1, 1.0) * suite.RATE)
    return out


def _music_notes(rng) -> list[list[tuple[int, float, float, int]]]:
    """Two or three voices (program, notes) of a 10 s piece: a melody, chords or a bass."""
    parts = []
    scale = np.array([0, 2, 4, 5, 7, 9, 11]) + int(rng.integers(0, 12))
    tempo = float(rng.uniform(0.15, 0.6))   # seconds a step
    for role in rng.choice(["melody", "chords", "bass"], size=int(rng.integers(1, 4)),
                           replace=False):
        notes, t = [], float(rng.uniform(0, 0.5))
        low = {"melody": 60, "chords": 48, "bass": 28}[role]
        while t < SECONDS - 0.3:
            dur = tempo * int(rng.integers(1, 5))
            degree = int(rng.integers(0, 7))
            root = low + int(scale[degree]) + 12 * int(rng.integers(0, 2))
            pitches = [root] if role != "chords" else [root, root + 4, root + 7]
            vel = int(rng.integers(50, 120))
            notes += [(min(p, 108), t, min(dur, SECONDS - t), vel) for p in pitches]
            t += dur
        parts.append(notes)
    return parts


def _events(rng) -> np.ndarray:
    n = int(suite.RATE * SECONDS)
    out = np.zeros(n)
    for _ in range(int(rng.integers(2, 5))):
        seconds = float(rng.uniform(1.0, 4.0))
        x = synthetic.synthesize(int(rng.integers(synthetic.NUM_CLASSES)), rng,
                                 sample_rate=suite.RATE, seconds=seconds)
        start = int(rng.integers(0, n - len(x)))
        out[start:start + len(x)] += x / (np.max(np.abs(x)) + 1e-9)
    return out


def _rms(x):
    return np.sqrt(np.mean(x ** 2)) + 1e-9


def make_corpus(out_dir: str, clips: int, seed: int = 0) -> str:
    """Writes ``clips`` 10 s WAV files under ``out_dir/audio``; returns that folder.
    Deterministic in (clips, seed) for given versions of the tools."""
    voices = suite.espeak_voices()
    audio_dir = os.path.join(out_dir, "audio")
    tmp = audio_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    plans = []
    for i in range(clips):
        rng = suite._rng(seed, "corpus", i)
        kind = KINDS[rng.choice(len(KINDS), p=KIND_WEIGHTS)]
        parts = ([kind] if kind != "mixture" else
                 list(rng.choice(["speech", "music", "events"], size=2, replace=False)))
        plans.append((i, rng, parts))
    # music: every part of every clip that needs one, rendered per GM program in one run
    music_jobs = {}
    for i, rng, parts in plans:
        if "music" in parts:
            for notes in _music_notes(rng):
                program = int(rng.integers(0, 104))
                music_jobs.setdefault(program, []).append((i, notes))
    music = {}
    for program, jobs in sorted(music_jobs.items()):
        rendered = suite.render(program, [notes for _, notes in jobs], SECONDS)
        for (i, _), x in zip(jobs, rendered):
            music[i] = music.get(i, 0) + x / _rms(x)
    for i, rng, parts in plans:
        layers = []
        for part in parts:
            if part == "speech":
                layers.append(_speech(rng, voices))
            elif part == "music":
                layers.append(music[i])
            else:
                layers.append(_events(rng))
        x = layers[0] / _rms(layers[0])
        for extra in layers[1:]:
            x = x + extra / _rms(extra) * 10 ** (rng.uniform(-12, 3) / 20)
        x = suite.channel(x, rng, room=(0.0, 0.8), snr_db=(5.0, 40.0))
        soundfile.write(os.path.join(tmp, f"{i:06d}_{'+'.join(parts)}.wav"), x, suite.RATE,
                        subtype="PCM_16")
    shutil.rmtree(audio_dir, ignore_errors=True)
    os.replace(tmp, audio_dir)  # a killed run leaves only the .partial folder
    return audio_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dwm_jax.suite.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="corpus")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--hours", type=float, default=3.0)
    p.add_argument("--name", default="corpus", help="the dataset: audio_folder/<name>")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    clips = int(round(args.hours * 3600 / SECONDS))
    if clips < 1:
        print("python -m dwm_jax.suite.corpus: error: --hours gives no clip", file=sys.stderr)
        return 2
    try:
        audio_dir = os.path.join(args.out, "audio")
        manifest = os.path.join(args.out, "corpus.json")
        wanted = {"clips": clips, "seed": args.seed, "versions": suite.versions()}
        made = os.path.isfile(manifest) and json.load(open(manifest)) == wanted
        if not made:
            make_corpus(args.out, clips, args.seed)
            with open(manifest, "w") as f:
                json.dump(wanted, f)
        cfg = data.audio_folder_config(args.name, audio_dir=audio_dir)
        b = data.build("audio_folder", args.data_dir, config=cfg)
    except (suite.SuiteError, data.BuildError) as e:
        print(f"python -m dwm_jax.suite.corpus: error: {e}", file=sys.stderr)
        return 2
    print(f"built {b.data_dir}: {clips} clips, {clips * SECONDS / 3600:.2f} hours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
