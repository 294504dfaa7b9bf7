"""Building datasets from the shell: ``python -m dwm_jax.data BUILDER --data_dir DIR ...``
(``dwm_jax.data.build(...)`` in Python).

Examples (the README has more)::

  # the built-in offline dataset (about 30 s on 2 cores)
  python -m dwm_jax.data synthetic_sounds --data_dir data
  # any folder of audio files, unlabelled (pretraining)
  python -m dwm_jax.data audio_folder --name my_audio --audio_dir /path/to/wavs \
      --data_dir data
  # ESC-50 from its own layout (5 folds -> splits fold1..fold5)
  python -m dwm_jax.data audio_folder --name esc50 --preset esc50 \
      --root /path/to/ESC-50-master --data_dir data
  # the same with 8 local worker processes (Apache Beam; pip install 'dwm_jax[beam]')
  python -m dwm_jax.data audio_folder --name my_audio --audio_dir /path/to/wavs \
      --data_dir data --workers 8
  # GTZAN with the fault-filtered split lists kept elsewhere
  python -m dwm_jax.data audio_folder --name gtzan --preset gtzan --root /path/to/gtzan \
      --split_file /path/to/music_dataset_split/GTZAN_split --data_dir data

A dataset lands in ``DATA_DIR/<builder>/<config name>/<version>/``. Building again with the
same settings reuses it; different settings under the same name are refused (pass
``overwrite``) so that two runs never silently read different data under one name.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from dwm_jax import audio, cli
from dwm_jax.data import builders, events


PROG = "python -m dwm_jax.data"


def _exit_interrupted(signum, frame):
    print("python -m dwm_jax.data: interrupted; the unfinished build is removed when the same "
          "command runs again", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builder", choices=sorted(builders.BUILDERS))
    p.add_argument("--data_dir", required=True, help="where datasets are stored")
    p.add_argument("--config", default="default",
                   help="synthetic_sounds: config name (default, small)")
    p.add_argument("--name", help="audio_folder: the dataset's name, e.g. esc50")
    p.add_argument("--preset", default="", help=f"audio_folder: one of {sorted(builders.PRESETS)}")
    p.add_argument("--root", default="", help="audio_folder with --preset: dataset top dir")
    p.add_argument("--audio_dir", default="", help="audio_folder: directory of audio files")
    p.add_argument("--csv", default="", help="audio_folder: filename,label[,split|fold] CSV")
    p.add_argument("--split_file", default="",
                   help="audio_folder with --preset vc1, cremad, gtzan or surge: the published "
                        "split list, where it is not under --root (see layouts.py)")
    p.add_argument("--label_column", default="label",
                   help="audio_folder: the CSV's label column ('' for none: e.g. a list of "
                        "files and splits whose events come with --events)")
    p.add_argument("--label_separator", default="",
                   help="audio_folder: several labels per clip in the label column, separated "
                        "by this (e.g. ','): a multi-label dataset, stored multi-hot")
    p.add_argument("--events", default="",
                   help="audio_folder: a strong-label table (CSV, or DCASE's TSV) of "
                        "filename, onset, offset, event_label: per-frame targets for sound "
                        "event detection")
    p.add_argument("--events_columns", default=",".join(events.EVENT_COLUMNS),
                   help="the events table's four columns: file, onset, offset, label")
    p.add_argument("--skip_bad_files", action="store_true",
                   help="skip (and report) unreadable or missing files instead of stopping")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--sample_rate", type=int, default=16000)
    p.add_argument("--n_mels", type=int, default=80)
    p.add_argument("--overwrite", action="store_true", help="rebuild if it exists")
    p.add_argument("--workers", type=int, default=1,
                   help="audio_folder: build with this many local worker processes on Apache "
                        "Beam (pip install 'dwm_jax[beam]'); the same dataset as with 1")
    p.add_argument("--beam_options", default="",
                   help="audio_folder: Beam pipeline options for a cluster runner, e.g. "
                        "'--runner=DataflowRunner --project=P --region=R "
                        "--temp_location=gs://B/tmp' (see parallel.py and the README)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS echoes the whole config at WARNING
    if args.workers != 1 or args.beam_options:
        # Beam's runner carries on through a KeyboardInterrupt: stop at once instead, leaving
        # TFDS's incomplete.* folder (never read as a dataset; the next run removes it)
        signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        if args.builder == "audio_folder":
            if not args.name:
                p.error("audio_folder needs --name")
            frontend = audio.LogMelFrontEnd(sample_rate=args.sample_rate, n_mels=args.n_mels,
                                            fmax=min(8000.0, args.sample_rate / 2))
            config = builders.audio_folder_config(
                args.name, root=args.root, preset=args.preset, audio_dir=args.audio_dir,
                csv_path=args.csv, split_file=args.split_file,
                skip_bad_files=args.skip_bad_files, dtype=args.dtype,
                label_separator=args.label_separator, events=args.events,
                **({} if args.preset else {"label_column": args.label_column}),
                events_columns=tuple(args.events_columns.split(",")),
                frontend=frontend)
        else:
            config = args.config
        ds_builder = builders.build(args.builder, args.data_dir, config=config,
                                    overwrite=args.overwrite, workers=args.workers,
                                    beam_options=args.beam_options)
    except (builders.BuildError, audio.AudioLoadError, ValueError) as e:  # one line, no trace
        return cli.fail(PROG, str(e))
    except cli.FILE_ERRORS as e:  # a read-only data_dir, an unreadable list, a file for a dir
        return cli.fail(PROG, cli.describe_os_error(e))
    splits = {k: v.num_examples for k, v in ds_builder.info.splits.items()}
    print(f"built {builders.bucket_dir(ds_builder, args.data_dir)}: {splits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
