"""The demo's whole code path, smoke-sized: shards -> CLIP -> CLIP-image precompute -> autoencoder -> prior -> base
U-Net (T5 + CLIP image embedding) -> latent super-resolution U-Net -> one bundle -> held-out prompts sampled
through the cascade -> report.json; a re-run resumes instead of retraining; a fresh process loading the bundle
reproduces the demo's images bit for bit.

The full demo (`make demo`) trains longer on more data; this guards the wiring, not the figures.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo import DemoSize

QUIET = ("data.num_workers=0", "log.progress_bar=false", "log.tensorboard=false")
SMOKE = DemoSize(
    train_samples=256, heldout_samples=64, prompts=4, variations=2, sample_steps=4,
    overrides={
        "clip": ("train.max_steps=4", "train.micro_batch_size=16", "eval.every_steps=4", "eval.max_samples=32",
                 "eval.batch_size=16", "ckpt.every_steps=4", *QUIET),
        "autoencoder": ("train.max_steps=4", "train.micro_batch_size=4", "train.sample_every=4",
                        "eval.every_steps=4", "eval.max_samples=16", "eval.batch_size=8", "ckpt.every_steps=4",
                        "model.loss.disc_start_step=2", *QUIET),
        "prior": ("train.max_steps=4", "train.micro_batch_size=16", "eval.every_steps=4", "eval.max_samples=32",
                  "eval.batch_size=16", "ckpt.every_steps=4", "model.stats_samples=32", *QUIET),
        "unet_base": ("train.max_steps=4", "train.micro_batch_size=8", "train.sample_every=4", "eval.every_steps=4",
                      "eval.max_samples=16", "eval.batch_size=8", "ckpt.every_steps=4", "model.eval_prompts=4",
                      "model.sampling.sampler.steps=4", *QUIET),
        "unet_sr": ("train.max_steps=4", "train.micro_batch_size=8", "train.sample_every=4", "eval.every_steps=4",
                    "eval.max_samples=16", "eval.batch_size=8", "ckpt.every_steps=4", "model.eval_prompts=4",
                    "model.sampling.sampler.steps=4", *QUIET),
    })
REPORT_KEYS = ("seconds", "clip_t2i_recall_at_1", "autoencoder_psnr", "prior_cos", "baseline_cos", "fidelity_colour",
               "fidelity_colour_no_guidance", "fidelity_position", "fd_clip", "fd_clip_no_guidance", "fd_clip_real",
               "clip_score", "clip_score_no_guidance", "clip_score_real")
REPO = Path(__file__).resolve().parents[1]
RESAMPLE = """
import json, sys
from pathlib import Path
from pipeline.sampling.text2image import Text2Image, to_pil
out = Path(sys.argv[1]); meta = json.loads((out / "samples" / "prompts.json").read_text())
images = Text2Image.from_bundle(out / "bundle").generate(meta["prompts"], seed=meta["seed"], steps=meta["steps"])
for i, image in enumerate(to_pil(images)):
    image.save(out / f"again_{i:03d}.png")
"""


DEMO = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_demo import SMOKE
from pipeline.demo import run_demo
sys.exit(run_demo(Path(sys.argv[1]), SMOKE))
"""


def run_smoke_demo(out: Path) -> str:
    """The demo in a fresh process, as `python -m pipeline demo` runs it (it owns its process group there)."""
    from train_helpers import subprocess_env

    done = subprocess.run([sys.executable, "-c", DEMO, str(out), str(Path(__file__).parent)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end_resumes_and_reproduces(tmp_path):
    out = run_smoke_demo(tmp_path)
    for text in ("CLIP text->image recall@1", "autoencoder PSNR", "prior: cosine", "prompt fidelity", "guidance on",
                 "Frechet distance in the demo CLIP's image space", "CLIP score against the prompts"):
        assert text in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(isinstance(report[key], (int, float)) for key in REPORT_KEYS), report
    assert Path(report["bundle"]) == (tmp_path / "bundle").resolve()
    assert report["machine"] in out  # the time is printed beside the CPU (or GPU) it was measured on
    # each fidelity figure carries the number of objects it judged (every prompt names at least one colour), and
    # the report prints its binomial standard error
    assert report["fidelity_colour_n"] >= report["prompts"] and "+-" in out
    index = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert set(index["components"]) == {"clip", "t5", "autoencoder", "prior", "unet_base", "unet_sr64"}
    assert index["cascade"] == ["unet_base", "unet_sr64"]
    assert index["components"]["unet_base"]["image_embed_dim"] > 0  # the prior's embedding conditions the base
    assert index["components"]["unet_sr64"]["space"] == "latent"  # the autoencoder's latents carry the SR stage
    assert (tmp_path / "samples.png").is_file() and len(list((tmp_path / "samples").glob("guided_*.png"))) == 4

    # Re-running reuses the shards and resumes every finished run at its last step: nothing is retrained.
    shard_times = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.tar")}
    run_smoke_demo(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.tar")} == shard_times
    for stage in ("clip", "autoencoder", "prior", "unet_base", "unet_sr"):
        steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / stage / "metrics.jsonl").read_text()
                 .splitlines()]
        assert steps[-1] == 4 and len(steps) == len(set(steps)), stage

    # A fresh process loading the bundle draws the same images, bit for bit.
    # Same thread count as the demo's process: CPU kernels split their reductions by thread, so bit-exact
    # reproduction holds for a given machine and OMP_NUM_THREADS (a different count changes the last bits).
    from train_helpers import subprocess_env

    done = subprocess.run([sys.executable, "-c", RESAMPLE, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for i in range(4):
        assert (tmp_path / f"again_{i:03d}.png").read_bytes() == (tmp_path / "samples" / f"guided_{i:03d}.png") \
            .read_bytes()


@pytest.mark.slow
def test_a_failing_step_stops_both_chains_with_one_line_naming_it(tmp_path):
    """The two training chains run in their own processes: a step that fails (here the autoencoder's config) ends
    the demo with one error naming the step and its log, the other chain is stopped, and no process is left."""
    import multiprocessing
    from dataclasses import replace

    from pipeline.demo import run_demo
    from pipeline.errors import PipelineError

    bad = replace(SMOKE, overrides={**SMOKE.overrides,
                                    "autoencoder": (*SMOKE.overrides["autoencoder"], "model.autoencoder.kind=vq2")})
    with pytest.raises(PipelineError, match=r"model\.autoencoder\.kind.*\(output: .*logs/autoencoder\.log\)") as error:
        run_demo(tmp_path, bad)
    assert "\n" not in str(error.value)
    assert not multiprocessing.active_children()
    # The CLIP chain was stopped, not left to finish: CLIP (about 10 s here) never reached the bundle.
    assert not (tmp_path / "bundle" / "clip").exists() and not (tmp_path / "report.json").exists()


def test_a_chain_that_dies_without_a_word_is_reported_with_its_log(tmp_path):
    """A chain process that crashes outside the demo's own errors (here a step name no chain knows: a KeyError)
    is still reported in one line naming the step and the log that holds its traceback; nothing hangs."""
    from pipeline.demo import Demo, train_chains
    from pipeline.errors import PipelineError

    demo = Demo(tmp_path, SMOKE)
    with pytest.raises(PipelineError, match=r"demo step nonsense crashed \(exit code 1\); its output: .*nonsense\.log"):
        train_chains(demo, (("nonsense",),))
    assert "KeyError: 'nonsense'" in (tmp_path / "logs" / "nonsense.log").read_text()
