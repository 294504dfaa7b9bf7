"""The HEAR 2021 API (hear-eval-kit's common API) over an encoder of ours.

    import dwm_jax.hear as hear
    model = hear.load_model("workdirs/demo")              # a workdir: a run or converted weights
    scene = hear.get_scene_embeddings(audio, model)       # [n_sounds, scene_embedding_size]
    frames, ms = hear.get_timestamp_embeddings(audio, model)
    # frames [n_sounds, n_timestamps, timestamp_embedding_size], ms [n_sounds, n_timestamps]

``audio`` is a float32 torch tensor ``[n_sounds, n_samples]`` at ``model.sample_rate``
(16 kHz), samples in [-1, 1]; integer PCM (int16, ...) is scaled to that range as audio
files are read, and other dtypes (bool, complex) are refused. An empty batch gives empty
outputs of the shapes its length implies. The model is a ``torch.nn.Module`` (hear-eval-kit's runner
takes it unchanged; ``pip install 'dwm_jax[hear]'`` brings torch) whose ``forward`` runs the
jitted JAX encoder through :class:`dwm_jax.embedding.Embedder`: the log-mel front end, the
normalisation and the authors' chunking of long inputs, so any length works (a 20-minute clip
in groups of encoder windows).

Scene embeddings are the mean over a clip's time steps (the authors' clip features).
Timestamp embeddings: one encoder time step spans a patch width (16 frames, 160 ms); the
encoder is run on the log-mel shifted by ``patch_width / shifts`` frames ``shifts`` times
(4 by default) and the steps are interleaved, so embeddings come at a regular 40 ms hop,
each with the time in milliseconds of the centre of the frames it covers; steps centred
past the clip's last frame are left out.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("hear", "torch")

import numpy as np
import torch

from dwm_jax.audio import to_float_samples
from dwm_jax.embedding import Embedder


class HearModel(torch.nn.Module):
    """An Embedder in a torch Module, with the attributes the HEAR API asks for.

    ``forward(audio [n, samples]) -> scene embeddings [n, D]``."""

    def __init__(self, embedder: Embedder, shifts: int = 4):
        super().__init__()
        patch_w = embedder.patch_w
        if shifts < 1 or patch_w % shifts:
            raise ValueError(f"shifts must divide the patch width {patch_w}; got {shifts}")
        self.embedder = embedder
        self.shifts = shifts
        self.sample_rate = int(embedder.frontend.sample_rate)
        self.scene_embedding_size = int(embedder.dim)
        self.timestamp_embedding_size = int(embedder.dim)
        frame_ms = 1000.0 * embedder.frontend.hop_length / self.sample_rate
        self.hop_ms = frame_ms * patch_w / shifts
        # a step over frames [a, a + pw) is centred on frame a + (pw - 1) / 2
        self.first_ms = frame_ms * (patch_w - 1) / 2

    def log_mels(self, audio) -> list[np.ndarray]:
        """[n, samples] (torch or NumPy; float in [-1, 1] or integer PCM, scaled as audio
        files are read) -> n raw log-mels [n_mels, frames]."""
        x = audio.detach().cpu().numpy() if torch.is_tensor(audio) else np.asarray(audio)
        if x.ndim != 2 or x.shape[1] == 0:
            raise ValueError(f"audio must be [n_sounds, n_samples] with samples; got {x.shape}")
        x = to_float_samples(x)
        return [self.embedder.frontend(clip) for clip in x]

    def timestamps_ms(self, frames: int) -> np.ndarray:
        """The centres in ms [T] of the embeddings of a log-mel of ``frames`` frames: every
        step of every shift, less those centred past the last frame (one always stays)."""
        hop, pw = self.embedder.patch_w // self.shifts, self.embedder.patch_w
        count = sum(-(-(frames - k * hop) // pw) for k in range(self.shifts) if frames > k * hop)
        times = self.first_ms + self.hop_ms * np.arange(count, dtype=np.float64)
        last_ms = 1000.0 * (frames - 1) * self.embedder.frontend.hop_length / self.sample_rate
        return times[:max(1, int(np.sum(times <= last_ms)))]

    def timestamp_features(self, log_mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One clip -> (embeddings [T, D] at a regular hop, their centres in ms [T])."""
        hop = self.embedder.patch_w // self.shifts
        runs = [self.embedder.time_features(log_mel[:, k * hop:])
                for k in range(self.shifts) if log_mel.shape[1] > k * hop]
        out = np.empty((sum(len(r) for r in runs), self.timestamp_embedding_size), np.float32)
        for k, r in enumerate(runs):   # step j of shift k starts at frame (j * shifts + k) hop
            out[k::len(runs)][: len(r)] = r
        times = self.timestamps_ms(log_mel.shape[1])
        return out[:len(times)], times

    def forward(self, audio) -> torch.Tensor:
        scenes = [self.embedder.clip_embedding(lm) for lm in self.log_mels(audio)]
        if not scenes:   # an empty batch
            return torch.zeros((0, self.scene_embedding_size), dtype=torch.float32)
        return torch.from_numpy(np.stack(scenes).astype(np.float32))


def load_model(model_file_path: str = "", shifts: int = 4) -> HearModel:
    """The encoder of a workdir (a training run or weights converted with
    ``python -m dwm_jax.convert``; its latest checkpoint) as a HEAR model."""
    if not model_file_path:
        raise ValueError("load_model needs a workdir: a training run or converted weights")
    return HearModel(Embedder.from_workdir(model_file_path), shifts=shifts)


def get_scene_embeddings(audio, model: HearModel) -> torch.Tensor:
    """[n_sounds, n_samples] -> float32 [n_sounds, model.scene_embedding_size]."""
    with torch.no_grad():
        return model(audio)


def get_timestamp_embeddings(audio, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_sounds, n_samples] -> (float32 [n_sounds, n_timestamps, D], float32 timestamps
    [n_sounds, n_timestamps] in milliseconds, centred on the frames each embedding covers)."""
    log_mels = model.log_mels(audio)
    if not log_mels:   # an empty batch: the shapes its sounds' length would give
        times = model.timestamps_ms(model.embedder.frontend.frames(int(audio.shape[1])))
        return (torch.zeros((0, len(times), model.timestamp_embedding_size)),
                torch.zeros((0, len(times))))
    pairs = [model.timestamp_features(lm) for lm in log_mels]
    embeddings = np.stack([e for e, _ in pairs])
    timestamps = np.stack([t for _, t in pairs]).astype(np.float32)
    return torch.from_numpy(embeddings), torch.from_numpy(timestamps)
