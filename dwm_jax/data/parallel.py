"""Parallel dataset builds on Apache Beam, through TFDS's Beam support.

``build(..., workers=N)`` (CLI ``--workers N``) runs the audio_folder builder as a Beam
pipeline on the local DirectRunner with N worker processes; ``beam_options`` (CLI
``--beam_options``) passes any Beam pipeline options, e.g. ``--runner=DataflowRunner
--project=P --region=R --temp_location=gs://B/tmp`` or a Flink or Spark runner, for a
cluster. Why Beam: it is what TFDS builds large datasets with, so the records, shards and
``dataset_info.json`` are written by the same TFDS code as a single-process build, and the
same pipeline runs unchanged on a cluster.

Per split: the rows (path, label, split) -> read + log-mel in the workers -> examples, which
TFDS shuffles and writes as array_record shards; two side branches combine the
per-clip statistics exactly (examples.SplitStats: integer sums, so the result does not
depend on how clips were divided among workers) and collect bad files, and write them to a
scratch folder inside the unfinished dataset's folder, read back when the pipeline is done.
A killed build leaves only TFDS's ``incomplete.*`` folder, which the next build removes.

Needs ``pip install 'dwm_jax[beam]'`` (apache-beam); TensorFlow is not needed.
"""

from __future__ import annotations

import functools
import json
import shlex
import uuid

from etils import epath

from dwm_jax import audio
from dwm_jax.data import examples


def pipeline_options(workers: int, beam_options: str = ""):
    """Beam PipelineOptions: ``beam_options`` (command-line style) plus, for the local
    DirectRunner, ``workers`` processes."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise examples.BuildError(
            "a parallel build (--workers > 1 or --beam_options) needs Apache Beam: "
            "pip install 'dwm_jax[beam]'") from None
    if workers < 1:
        raise examples.BuildError(f"--workers must be at least 1; got {workers}")
    defaults = {"direct_num_workers": workers, "direct_running_mode": "multi_processing"}
    given = {flag.split("=")[0].lstrip("-") for flag in shlex.split(beam_options)}
    return PipelineOptions(shlex.split(beam_options),
                           **{k: v for k, v in defaults.items() if k not in given})


def scratch_dir(under: str) -> str:
    """A folder for the side outputs, inside the unfinished dataset's folder (which TFDS
    renames to the dataset only when it is complete; the scratch is removed before)."""
    path = epath.Path(under) / f"incomplete.beam-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def remove_scratch(path: str):
    if path and epath.Path(path).exists():
        epath.Path(path).rmtree()


def _read_clip(indexed_row, cfg, index, n_mels):
    """One row -> (key, example) on the main output, its statistics on 'stats', or a bad
    file on 'bad' (with the row's position, to report bad files in the order of the rows)."""
    from apache_beam import pvalue
    position, row = indexed_row
    try:
        key, example = examples.clip_example(row, cfg, index)
    except audio.AudioLoadError as e:
        yield pvalue.TaggedOutput("bad", (position, {"file": row.path, "reason": str(e)}))
        return
    stats = examples.SplitStats(n_mels)
    stats.add(example["log_mel"])
    yield pvalue.TaggedOutput("stats", stats)
    yield key, example


def _merge_stats(parts, n_mels):
    """Associative and commutative (exact integer sums): Beam may call it on any grouping."""
    total = examples.SplitStats(n_mels)
    for part in parts:
        total.merge(part)
    return total


def _write_json(value, path):
    epath.Path(path).write_text(json.dumps(value))


def split_transform(split: str, rows: list, cfg, index: dict, scratch: str):
    """The Beam PTransform that makes ``split``'s (key, example) pairs for TFDS to write."""
    import apache_beam as beam
    n_mels = cfg.frontend.n_mels

    @beam.ptransform_fn
    def transform(root):
        read = (root
                | f"ListRows_{split}" >> beam.Create(list(enumerate(rows)))
                | f"Spread_{split}" >> beam.Reshuffle()
                | f"ReadClips_{split}" >> beam.FlatMap(
                    _read_clip, cfg=cfg, index=index, n_mels=n_mels).with_outputs(
                        "stats", "bad", main="examples"))
        _ = (read.stats
             | f"CombineStats_{split}" >> beam.CombineGlobally(
                 functools.partial(_merge_stats, n_mels=n_mels))
             | f"StatsJson_{split}" >> beam.Map(lambda s: s.to_json())
             | f"WriteStats_{split}" >> beam.Map(
                 _write_json, path=f"{scratch}/{split}.stats.json"))
        _ = (read.bad
             | f"CollectBad_{split}" >> beam.combiners.ToList()
             | f"SortBad_{split}" >> beam.Map(lambda bad: [b for _, b in sorted(bad)])
             | f"WriteBad_{split}" >> beam.Map(
                 _write_json, path=f"{scratch}/{split}.bad.json"))
        return read.examples

    return transform()


def split_results(scratch: str, split: str) -> tuple[dict, list[dict]]:
    """(statistics, skipped files) of ``split`` written by its pipeline branches."""
    stats = json.loads((epath.Path(scratch) / f"{split}.stats.json").read_text())
    bad = json.loads((epath.Path(scratch) / f"{split}.bad.json").read_text())
    return stats, bad
