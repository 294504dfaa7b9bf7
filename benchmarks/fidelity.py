"""How close our M2D and MSM-MAE are to the authors' PyTorch code: the largest differences.

  python -m benchmarks.fidelity

Loads the authors' weights (tests/data/reference, through dwm_jax.convert) into our modules
and prints, per stage, the largest absolute difference from what their code computed on the
same input and mask (the loss as a relative difference; gradients relative to each tensor's
largest entry). The assertions live in tests/test_reference.py, whose fixture loader this
script reuses.
"""

from __future__ import annotations

import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tests.test_reference import Ref, _initial_state, _setup

from dwm_jax import audio, masking, torch_layout
from dwm_jax.normalisation import NormStats
from dwm_jax.train import step as step_lib
from dwm_jax.embedding import Embedder


def largest(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs).max())


def stages(r: Ref) -> dict[str, float]:
    z, m = r.z, r.model
    out = {"patch embedding": largest(m.encoder.patch_embed(masking.patchify(r.x, (16, 16))),
                                      z["fwd/patch_embed_out"]),
           "tokens + positions": largest(m.encoder.embed(r.x), z["fwd/tokens_pos"])}
    latent = m.encoder(r.x, r.mask.ids_keep)
    out["encoder output (visible)"] = largest(latent, z["fwd/latent"])
    if r.objective == "m2d":
        out["predictor output"] = largest(m.predictor(latent, r.mask.ids_restore),
                                          z["fwd/pred_all"])
        out["target (standardised)"] = largest(m.target_outputs(r.x, r.mask, r.target),
                                               z["fwd/target_standardised"])
    else:
        out["decoder output"] = largest(m.predict(r.x, r.mask), z["fwd/pred_all"])
        out["target (norm-pix)"] = largest(m.reconstruction_target(r.x), z["fwd/target"])
    loss, grads = jax.value_and_grad(r.loss_fn)(r.params)
    out["loss (relative)"] = abs(float(loss) - float(z["loss"])) / float(z["loss"])
    out["gradients (relative to tensor max)"] = max(
        largest(g, z[f"grads/{k}"]) / np.abs(z[f"grads/{k}"]).max()
        for k, g in r.torch_names(grads).items())
    setup = _setup(r)
    theirs = {k[len("grads/"):]: v for k, v in z.items() if k.startswith("grads/")}
    grads = torch_layout.from_torch({**r.state_dict, **theirs}, r.objective)["params"]
    new = step_lib.apply_gradients(setup, _initial_state(r, setup), grads)
    after = torch_layout.to_torch(new["params"], new["target"] or None, r.objective, (16, 16))
    out["AdamW step on their gradients"] = max(
        largest(v, z[f"after_step/{k}"]) for k, v in after.items() if k in theirs)
    if r.objective == "m2d":
        out["EMA target after the step"] = max(largest(v, z[f"after_step/{k}"])
                                               for k, v in after.items()
                                               if k.startswith("target"))
        emb = Embedder(m.encoder, NormStats(float(z["norm_mean"]), float(z["norm_std"])))
        out["runtime features, 10 s clips"] = max(
            largest(emb.time_features(z["portable/lms_raw"][i, 0]), z["portable/features"][i])
            for i in range(2))
        out["clip embedding from the waveform"] = max(
            largest(emb.from_waveform(z["portable/wave"][i], 16000),
                    z["portable/scene_embeddings"][i]) for i in range(2))
        front_end = audio.LogMelFrontEnd()
        pairs = [*zip(z["wave"], z["lms_raw_full"]), *zip(z["portable/wave"],
                                                         z["portable/lms_raw"])]
        out["front end (log-mel)"] = max(largest(front_end(w), lms[0]) for w, lms in pairs)
    return out


def main():
    print("| objective | stage | largest difference |\n|---|---|---:|")
    for objective in ("m2d", "msm_mae"):
        for stage, value in stages(Ref(objective)).items():
            print(f"| {objective} | {stage} | {value:.2g} |")


if __name__ == "__main__":
    main()
